"""Read and write LoRA files (kohya, diffusers, peft) as one canonical in-memory `LoRA`.

Civitai LoRAs come in several layouts. Whatever the file, `load_lora` returns a `LoRA` whose modules are keyed by
their canonical diffusers names (`"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"`,
`"text_encoder.text_model.encoder.layers.0.self_attn.q_proj"`), with `down` (r × in[, kh, kw]) and `up`
(out × r[, 1, 1]) factors in float32 and the kohya-style `alpha`, so that ΔW = (alpha / r) · up · down.
kohya keys are mapped with diffusers' own conversion utilities (`lora_conversion_utils`).

Files are read with the safetensors library's own `safe_open`, which refuses malformed files (overlapping or
out-of-file tensor offsets, holes or trailing bytes, duplicate keys, a non-object `__metadata__`, headers over
100 MB or nested too deeply); the error names the file. Only plain low-rank LoRAs stored as safetensors are
accepted. Anything else is rejected with an error saying
what the file is and what to do: LyCORIS variants (LoCon with Tucker `lora_mid`, LoHa, LoKr), DoRA, full model
checkpoints, pickled files (`.ckpt`, `.pt`, `.bin`), truncated or corrupt files, and LoRAs made for another base
architecture than the one asked for.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# Substrings of keys that identify formats we do not reduce, with the name reported to the user.
UNSUPPORTED_KEY_MARKERS: tuple[tuple[str, str], ...] = (
    ("hada_w1", "LoHa (LyCORIS Hadamard product)"),
    ("hada_w2", "LoHa (LyCORIS Hadamard product)"),
    ("lokr_w1", "LoKr (LyCORIS Kronecker product)"),
    ("lokr_w2", "LoKr (LyCORIS Kronecker product)"),
    ("lora_mid", "LoCon with Tucker/CP mid weights (LyCORIS)"),
    ("dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    ("oft_blocks", "OFT (orthogonal fine-tuning)"),
    ("oft_diag", "OFT (orthogonal fine-tuning)"),
)
FULL_CHECKPOINT_MARKERS = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.embedders.",
)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# Substrings of the down-factor keys of every layout read: kohya, peft/diffusers, and the attention-processor
# layouts of older diffusers (`….processor.to_q_lora.down.weight`, `….lora.down.weight`, `….lora_linear_layer…`).
LORA_KEY_MARKERS = ("lora_down", "lora_A", ".lora.down.", "_lora.down.", "lora_linear_layer")
OLD_PROCESSOR_KEY = re.compile(r"(\.processor\.|_lora\.(down|up)\.|\.lora\.(down|up)\.)")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Metadata marking a LoRA whose factors are the coordinates of a weight-space vector (kept as they are on reading).
W2W_GAUGE_KEY, W2W_GAUGE_VECTOR = "imagegem_hf_w2w_gauge", "weight_space_vector"
# Cross-attention context width (in-features of attn2.to_k) → base architecture.
CONTEXT_DIM_TO_BASE = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
# kohya trains SDXL on the SGM UNet (input_blocks / output_blocks); its block layout has 2 layers per block.
SDXL_SGM_UNET_CONFIG = SimpleNamespace(layers_per_block=2)


@dataclass
class LoRAModule:
    """The low-rank update of one layer: ΔW = (alpha / rank) · up · down.

    Attributes:
        down: `(rank, in_features)` for linear layers, `(rank, in_channels, kh, kw)` for convolutions.
        up: `(out_features, rank)` for linear layers, `(out_channels, rank, 1, 1)` for convolutions.
        alpha: kohya-style alpha; `None` means alpha = rank (scale 1, the diffusers/peft convention).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Input size of the flattened layer (`in_channels · kh · kw` for convolutions)."""
        return int(self.down[0].numel())

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """`()` for linear layers, `(kh, kw)` for convolutions."""
        return tuple(self.down.shape[2:])

    def up_2d(self) -> torch.Tensor:
        return self.up.reshape(self.out_features, self.rank)

    def down_2d(self) -> torch.Tensor:
        return self.down.reshape(self.rank, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        """The dense ΔW, `(out, in · kh · kw)`. Only for tests and small layers: reductions never call it."""
        return self.scale * self.up_2d() @ self.down_2d()


@dataclass
class LoRA:
    """A LoRA as canonical diffusers module name → `LoRAModule`.

    Attributes:
        modules: Modules in a deterministic (sorted) order.
        base: Detected base architecture (`"sd15"`, `"sd2"`, `"sdxl"`, or `"unknown"`).
        source_format: The format it was read from (`"kohya"`, `"diffusers"`, `"peft"`, or `"memory"`).
        metadata: Free-form metadata (the safetensors header metadata of the file, if any).
    """

    modules: dict[str, LoRAModule]
    base: str = "unknown"
    source_format: str = "memory"
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules = dict(sorted(self.modules.items()))
        if self.base == "unknown":
            self.base = detect_base(self.modules)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: module.rank for name, module in self.modules.items()}

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys `"<module>.lora_A.weight"` / `"<module>.lora_B.weight"` with the scale folded into `lora_B`.

        The result loads with `pipe.load_lora_weights(state_dict)` and reproduces ΔW exactly (no alphas are
        needed because every module has scale 1).
        """
        state_dict = {}
        for name, module in self.modules.items():
            state_dict[f"{name}.lora_A.weight"] = module.down.contiguous()
            state_dict[f"{name}.lora_B.weight"] = (module.up * module.scale).contiguous()
        return state_dict

    def to_kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """kohya keys (`lora_unet_…` / `lora_te_…` / `lora_te2_…`, `lora_down`, `lora_up`, `alpha`)."""
        state_dict = {}
        for name, module in self.modules.items():
            component, _, path = name.partition(".")
            prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}.get(component)
            if prefix is None:
                raise ValueError(f"Module {name!r} is not in unet/text_encoder/text_encoder_2; kohya cannot name it.")
            key = prefix + path.replace(".", "_")
            state_dict[f"{key}.lora_down.weight"] = module.down.contiguous()
            state_dict[f"{key}.lora_up.weight"] = module.up.contiguous()
            alpha = module.rank if module.alpha is None else module.alpha
            state_dict[f"{key}.alpha"] = torch.tensor(float(alpha))
        return state_dict


def detect_base(modules: dict[str, LoRAModule]) -> str:
    """Guess the base architecture from the cross-attention context width and the text encoders present."""
    return _base_from_shapes({name: (0, module.in_features, ()) for name, module in modules.items()})


def _base_from_shapes(shapes: dict[str, tuple[int, int, tuple[int, ...]]]) -> str:
    if any(name.startswith("text_encoder_2.") for name in shapes):
        return "sdxl"
    for name, (_, in_features, _) in shapes.items():
        if name.startswith("unet.") and name.endswith("attn2.to_k"):
            return CONTEXT_DIM_TO_BASE.get(in_features, "unknown")
    return "unknown"


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle-based checkpoint ({path.suffix}); loading it could run arbitrary code, so it is "
            "refused. Convert it to .safetensors in a trusted environment (or download the safetensors version)."
        )
    with open(path, "rb") as handle:
        head = handle.read(9)
    is_safetensors = head[8:9] == b"{"  # 8-byte header length, then the JSON header
    if not is_safetensors and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ValueError(
            f"{path} holds a pickled (torch.save) checkpoint despite its name; it is refused because unpickling can "
            "run arbitrary code. Convert it to safetensors in a trusted environment."
        )


def _read_file(path: Path, header_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`(tensors, metadata)` of a safetensors file, read with `safetensors.safe_open` (tensors in the file's
    dtype); with `header_only`, meta-device placeholders of the right shapes (alphas are read).

    Raises:
        ValueError: The library refuses the file (the message names it and says what is wrong).
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if not header_only:
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
            tensors = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
            tensors.update({key: handle.get_tensor(key) for key in tensors if key.endswith(".alpha")})
            return tensors, metadata
    except SafetensorError as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file (corrupt or truncated: {err}). Re-download or re-export it."
    )


def _reject_unsupported(keys: list[str], path: Path | str) -> None:
    joined = "\n".join(keys)
    for marker, name in UNSUPPORTED_KEY_MARKERS:
        if marker in joined:
            raise ValueError(
                f"{path} is a {name} file (keys contain {marker!r}); only plain low-rank LoRAs (lora_down/lora_up "
                "or lora_A/lora_B) are supported. Extract a LoRA from it first (e.g. kohya's extract_lora)."
            )
    if not any(marker in joined for marker in LORA_KEY_MARKERS):
        if any(key.startswith(FULL_CHECKPOINT_MARKERS) for key in keys) or any(
            key.endswith(("conv_in.weight", "norm1.weight", "proj_in.weight")) for key in keys
        ):
            raise ValueError(
                f"{path} is a full model checkpoint, not a LoRA. Extract a LoRA (the difference to its base model) "
                "first, e.g. with kohya's networks/extract_lora_from_models.py."
            )
        raise ValueError(
            f"{path} has no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys; first keys: {keys[:3]}). "
            "Is it a textual inversion embedding or another adapter type?"
        )


def _pattern_value(module: str, pattern: dict[str, Any], default: Any) -> Any:
    """peft's rank/alpha pattern lookup: a key matches the full module name or a dotted suffix of it."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def _alphas_from_peft_config(component: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "component": component,
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "use_rslora": bool(config.get("use_rslora", False)),
    }


def _module_alpha(module_path: str, rank: int, peft_config: dict[str, Any] | None) -> float | None:
    """kohya-style alpha that reproduces peft's scaling (lora_alpha / r, or / √r with rsLoRA)."""
    if peft_config is None or peft_config["lora_alpha"] is None:
        return None
    lora_alpha = float(_pattern_value(module_path, peft_config["alpha_pattern"], peft_config["lora_alpha"]))
    scale = lora_alpha / (rank**0.5) if peft_config["use_rslora"] else lora_alpha / rank
    return scale * rank


def _from_kohya(tensors: dict[str, torch.Tensor], unet_config: Any | None) -> tuple[dict[str, LoRAModule], str]:
    alphas = {k[: -len(".alpha")]: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    signature = tuple(sorted((k, tuple(v.shape)) for k, v in tensors.items() if not k.endswith(".alpha")))
    layers_per_block = (unet_config or SDXL_SGM_UNET_CONFIG).layers_per_block
    modules = {}
    for name, down_key, up_key in _kohya_module_keys(signature, layers_per_block):
        kohya_name = down_key.split(".", 1)[0]
        modules[name] = LoRAModule(down=tensors[down_key], up=tensors[up_key], alpha=alphas.get(kohya_name))
    return modules, "kohya"


@functools.lru_cache(maxsize=64)
def _kohya_module_keys(signature: tuple[tuple[str, tuple[int, ...]], ...], layers_per_block: int) -> tuple:
    """`(canonical name, down key, up key)` per module of a kohya file whose tensors have these `(key, shape)`s.

    diffusers' converters only rename keys, so they run once per layout on meta placeholders (a collection of
    LoRAs repeats a handful of layouts) and each module is traced back to its keys by tensor identity.
    """
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        DIFFUSERS_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    # kohya text-encoder keys come out with attention in the old naming and MLPs in the new one: map both
    text_encoder_mapping = {**DIFFUSERS_OLD_TO_PEFT, **DIFFUSERS_TO_PEFT}

    state_dict = {key: torch.empty(shape, device="meta") for key, shape in signature}
    key_of = {id(tensor): key for key, tensor in state_dict.items()}
    if any(p in key for key in state_dict for p in ("input_blocks", "middle_block", "output_blocks")):
        state_dict = _maybe_map_sgm_blocks_to_diffusers(state_dict, SimpleNamespace(layers_per_block=layers_per_block))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state_dict)
    peft_keys: dict[str, torch.Tensor] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(component) + 1 :]: v for k, v in converted.items() if k.split(".", 1)[0] == component}
        if not part:
            continue
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict(part, text_encoder_mapping)
        peft_keys.update({f"{component}.{k}": v for k, v in part.items()})
    pairs = _peft_pairs(peft_keys)
    return tuple((name, key_of[id(down)], key_of[id(up)]) for name, (down, up) in sorted(pairs.items()))


def _peft_pairs(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (lora_A, lora_B)}` from peft-style keys."""
    downs = {k[: -len(".lora_A.weight")]: v for k, v in state_dict.items() if k.endswith(".lora_A.weight")}
    ups = {k[: -len(".lora_B.weight")]: v for k, v in state_dict.items() if k.endswith(".lora_B.weight")}
    if set(downs) != set(ups):
        missing = sorted(set(downs) ^ set(ups))[:3]
        raise ValueError(f"LoRA modules with only one of lora_A/lora_B: {missing}. The file is incomplete.")
    return {name: (down, ups[name]) for name, down in downs.items()}


def _old_processor_keys_to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the attention-processor LoRAs of older diffusers (`….attn1.processor.to_q_lora.down.weight`,
    `….lora.down.weight`) renamed as diffusers' loaders do: `convert_unet_state_dict_to_peft` for the UNet, the
    old/new text-encoder mappings for the text encoders. Files without component prefixes are UNet-only (the
    legacy `pytorch_lora_weights` layout), as diffusers reads them."""
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        DIFFUSERS_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    if not any(key.split(".", 1)[0] in COMPONENTS for key in state):
        state = {f"unet.{key}": value for key, value in state.items()}
    converted = {}
    for component in COMPONENTS:
        part = {k[len(component) + 1 :]: v for k, v in state.items() if k.split(".", 1)[0] == component}
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict(part, {**DIFFUSERS_OLD_TO_PEFT, **DIFFUSERS_TO_PEFT})
        converted.update({f"{component}.{k}": v for k, v in part.items()})
    return converted | {k: v for k, v in state.items() if k.split(".", 1)[0] not in COMPONENTS}


def _from_diffusers_or_peft(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], peft_config: dict[str, Any] | None
) -> tuple[dict[str, LoRAModule], str]:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

    fmt = "peft" if peft_config is not None or any(k.startswith("base_model.model.") for k in tensors) else "diffusers"
    state = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    if any(OLD_PROCESSOR_KEY.search(k) for k in state):
        state = _old_processor_keys_to_peft(state)
    elif any("lora_linear_layer" in k for k in state):  # diffusers 0.2x text-encoder keys
        state = convert_state_dict_to_peft(state)
    prefix = "base_model.model."
    component = (peft_config or {}).get("component", "unet")
    state = {(f"{component}.{k[len(prefix) :]}" if k.startswith(prefix) else k): v for k, v in state.items()}
    modules = {name: LoRAModule(down=down, up=up) for name, (down, up) in _peft_pairs(state).items()}
    configs: dict[str, dict[str, Any]] = {}
    if peft_config is not None:
        configs[component] = peft_config
    elif "lora_adapter_metadata" in metadata:  # written by diffusers' save_lora_weights(..., *_lora_adapter_metadata)
        packed = json.loads(metadata["lora_adapter_metadata"])
        for comp in {key.split(".", 1)[0] for key in packed}:
            sub = {k[len(comp) + 1 :]: v for k, v in packed.items() if k.startswith(comp + ".")}
            configs[comp] = _alphas_from_peft_config(comp, sub)
    for name, module in modules.items():
        comp, _, path = name.partition(".")
        module.alpha = _module_alpha(path, module.rank, configs.get(comp))
    alphas = {k[: -len(".alpha")]: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    for name, module in modules.items():
        if name in alphas:
            module.alpha = alphas[name]
    return modules, fmt


def load_lora(
    path: str | os.PathLike,
    base: str | None = None,
    unet_config: Any | None = None,
    dtype=torch.float32,
    header_only: bool = False,
) -> LoRA:
    """Read a LoRA safetensors file (kohya, diffusers or peft layout) into a canonical `LoRA`.

    Args:
        path: A `.safetensors` file, or a peft adapter folder (`adapter_model.safetensors` + `adapter_config.json`,
            whose `lora_alpha`, `alpha_pattern` and `use_rslora` set the scales).
        base: Expected base architecture (`"sd15"`, `"sd2"`, `"sdxl"`); a LoRA detected as another one is
            rejected. `None` accepts any.
        unet_config: Config of the target UNet, used to map kohya SGM block names (`input_blocks_…`); defaults to
            SDXL's layout, the only base kohya trains on the SGM UNet.
        dtype: Floating dtype of the returned factors (fp16/bf16 files are upcast).
        header_only: Read only the header: factors are `meta`-device tensors with the right shapes (alphas are
            real). Used to collect the module list of many LoRAs cheaply.

    Returns:
        The `LoRA`, modules in sorted canonical-name order.

    Raises:
        ValueError: Pickle files, unsupported adapter types, full checkpoints, corrupt or truncated files, or a
            base architecture other than `base`. The message says what the file is and what to do.
        FileNotFoundError: `path` does not exist.

    Example:
        ```python
        >>> from imagegem_hf.w2w import load_lora
        >>> lora = load_lora("my_civitai_lora.safetensors", base="sdxl")  # doctest: +SKIP
        >>> sorted(lora.modules)[:1]  # doctest: +SKIP
        ['unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k']
        ```
    """
    lora = map_lora(path, base=base, unet_config=unet_config, header_only=header_only)
    if not header_only:
        for module in lora.modules.values():
            module.down, module.up = module.down.to(dtype), module.up.to(dtype)
    return lora


def map_lora(
    path: str | os.PathLike,
    base: str | None = None,
    unet_config: Any | None = None,
    header_only: bool = False,
) -> LoRA:
    """`load_lora` without the upcast: the factors keep the file's dtype (fp16/bf16 as stored), for streaming
    reductions that read each factor once or twice (`rank1_reduce` upcasts module by module).

    Example:
        ```python
        >>> from imagegem_hf.w2w.lora_io import map_lora
        >>> from imagegem_hf.w2w.reduce import reduced_factors
        >>> factors = reduced_factors(map_lora("my_civitai_lora.safetensors"))  # doctest: +SKIP
        ```
    """
    path, peft_config = _resolve(path)
    tensors, metadata = _read_file(path, header_only)
    return _lora_from_tensors(path, tensors, metadata, peft_config, unet_config, base)


def _lora_from_tensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    peft_config: dict[str, Any] | None,
    unet_config: Any | None,
    base: str | None,
) -> LoRA:
    keys = sorted(tensors)
    _reject_unsupported(keys, path)
    if all(key.startswith(KOHYA_PREFIXES) for key in keys):
        modules, fmt = _from_kohya(tensors, unet_config)
    elif any(key.startswith(KOHYA_PREFIXES) for key in keys):
        raise ValueError(f"{path} mixes kohya keys (lora_unet_…) with other keys; re-export it in one format.")
    else:
        modules, fmt = _from_diffusers_or_peft(tensors, metadata, peft_config)
    for name, module in modules.items():
        _check_ranks(path, name, tuple(module.down.shape), tuple(module.up.shape))
    lora = LoRA(modules=modules, source_format=fmt, metadata=metadata)
    _check_base(path, lora.base, base)
    return lora


def _check_ranks(path: Path, name: str, down: tuple[int, ...], up: tuple[int, ...]) -> None:
    """Refuse a module whose factors do not chain (`up` is out × r[, 1, 1], `down` r × in[, kh, kw])."""
    if len(down) < 2 or len(up) < 2 or down[0] != up[1]:
        raise ValueError(
            f"{path}: module {name} has a down factor of shape {list(down)} and an up factor of shape {list(up)}; "
            "their ranks (down's first and up's second dimension) must be equal. The file is inconsistent: "
            "re-export it."
        )


def _resolve(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """The safetensors file behind `path` (a file or a peft adapter folder), and the folder's peft scales."""
    path, peft_config = Path(path), None
    if path.is_dir():
        config_path = path / "adapter_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} is a folder without adapter_config.json; pass the .safetensors file.")
        peft_config = _alphas_from_peft_config("unet", json.loads(config_path.read_text()))
        path = path / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist.")
    _check_not_pickle(path)
    return path, peft_config


def _check_base(path: Path, detected: str, expected: str | None) -> None:
    if expected is not None and detected not in (expected, "unknown"):
        raise ValueError(
            f"{path} is a {detected} LoRA, but a {expected} one was expected (architecture mismatch). Use LoRAs "
            f"trained on the same base model as the weight space."
        )


def save_lora(lora: LoRA, path: str | os.PathLike, format: str = "diffusers", dtype=torch.float32) -> Path:
    """Write a `LoRA` as safetensors (written to a temporary name, then renamed into place).

    Args:
        lora: The LoRA to write.
        path: Target `.safetensors` file.
        format: `"diffusers"` (the default: keys `unet.….lora_A.weight`, scale folded into `lora_B`; every module,
            text encoders included, loads with `pipe.load_lora_weights`) or `"kohya"` (`lora_unet_…` /
            `lora_te_…`, with alphas, for A1111/ComfyUI). diffusers reads kohya files too, but with diffusers 0.42
            and transformers 5 it drops the text-encoder attention modules of a kohya file on load, so an edit
            saved as kohya loses part of its effect in diffusers: keep the default unless the file is for
            A1111/ComfyUI.
        dtype: Storage dtype (`torch.float16` halves the size).

    Returns:
        The written path.

    Example:
        ```python
        >>> from imagegem_hf.w2w import load_lora, save_lora
        >>> save_lora(load_lora("in.safetensors"), "out_kohya.safetensors", format="kohya")  # doctest: +SKIP
        ```
    """
    if format == "diffusers":
        state_dict = lora.to_diffusers_state_dict()
    elif format == "kohya":
        state_dict = lora.to_kohya_state_dict()
    else:
        raise ValueError(f"Unknown LoRA format {format!r}; use 'diffusers' or 'kohya'.")
    state_dict = {k: (v.to(dtype) if k.endswith(".weight") else v.float()) for k, v in state_dict.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    metadata = {"format": "pt", "imagegem_hf_lora_format": format}
    if W2W_GAUGE_KEY in lora.metadata:  # edits of a weight space keep their factors when read back
        metadata[W2W_GAUGE_KEY] = lora.metadata[W2W_GAUGE_KEY]
    save_file(state_dict, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_lora_shapes(path: str | os.PathLike, base: str | None = None) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """`{canonical module: (out_features, in_features, kernel_size)}` read from the file header only.

    Example:
        ```python
        >>> from imagegem_hf.w2w.lora_io import read_lora_shapes
        >>> read_lora_shapes("my_lora.safetensors")  # doctest: +SKIP
        {'unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q': (1280, 1280, ())}
        ```
    """
    return read_lora_header(path, base)[1]


def read_lora_header(
    path: str | os.PathLike, base: str | None = None
) -> tuple[str, dict[str, tuple[int, int, tuple[int, ...]]]]:
    """`(detected base, {canonical module: (out_features, in_features, kernel_size)})` from the header alone.

    kohya files (the bulk of Civitai) are resolved from the header's shapes and the memoised key mapping; other
    layouts go through `map_lora(header_only=True)`. The same checks as `load_lora` apply.

    Example:
        ```python
        >>> from imagegem_hf.w2w.lora_io import read_lora_header
        >>> base, shapes = read_lora_header("my_lora.safetensors")  # doctest: +SKIP
        ```
    """
    file, peft_config = _resolve(path)
    tensors, metadata = _read_file(file, header_only=True)
    keys = sorted(tensors)
    if peft_config is not None or not all(key.startswith(KOHYA_PREFIXES) for key in keys):
        lora = _lora_from_tensors(file, tensors, metadata, peft_config, None, base)
        return lora.base, {name: (m.out_features, m.in_features, m.kernel_size) for name, m in lora.modules.items()}
    _reject_unsupported(keys, file)
    signature = tuple(sorted((key, tuple(t.shape)) for key, t in tensors.items() if not key.endswith(".alpha")))
    shapes = {}
    for name, down_key, up_key in _kohya_module_keys(signature, SDXL_SGM_UNET_CONFIG.layers_per_block):
        down, up = tuple(tensors[down_key].shape), tuple(tensors[up_key].shape)
        _check_ranks(file, name, down, up)
        shapes[name] = (up[0], math.prod(down[1:]), down[2:])
    detected = _base_from_shapes(shapes)
    _check_base(file, detected, base)
    return detected, dict(sorted(shapes.items()))


def lora_target_shapes(
    model: torch.nn.Module, target_modules: Sequence[str], prefix: str = "unet"
) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """`{canonical name: (out_features, in_features, kernel_size)}` of the layers of `model` a LoRA would target.

    A layer is targeted when its name ends with one of `target_modules` (peft's rule), e.g.
    `["to_q", "to_k", "to_v", "to_out.0"]`. The result is a `WeightSpace` layout (`modules=`) for that model.

    Example:
        ```python
        >>> from imagegem_hf.testing import tiny_sd_components
        >>> from imagegem_hf.w2w.lora_io import lora_target_shapes
        >>> shapes = lora_target_shapes(tiny_sd_components()["unet"], ["to_q", "to_v"])
        >>> shapes["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
        (8, 8, ())
        ```
    """
    shapes = {}
    for name, layer in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        if isinstance(layer, torch.nn.Linear):
            shapes[f"{prefix}.{name}"] = (layer.out_features, layer.in_features, ())
        elif isinstance(layer, torch.nn.Conv2d):
            kernel = tuple(int(k) for k in layer.kernel_size)
            shapes[f"{prefix}.{name}"] = (layer.out_channels, layer.in_channels * kernel[0] * kernel[1], kernel)
    if not shapes:
        raise ValueError(f"No Linear/Conv2d layer of the model matches {list(target_modules)}.")
    return dict(sorted(shapes.items()))
