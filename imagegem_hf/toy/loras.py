"""User-made LoRAs of the toy world: a population of styles, fine-tuned together, saved as kohya files.

Each toy "user" has a style: a colour grade of every image they make, along two axes that are measured back from
pixels (`style_measures`): **warmth** (a red/blue tint, R − B of the background) and **brightness** (an exposure
curve, the background's green level). Colour grades are among the commonest Civitai LoRA styles, and unlike the
content they never appear in prompts. The two axes are correlated across the population (`ToyLoRAConfig.correlation`),
as styles are in real collections: a direction learnt for one drags the other along, which is what `debias` must undo.
Each user's LoRA is fine-tuned from the toy base pipeline on renders of the toy world graded in that style, with a
rank drawn from 1–16 and a kohya alpha of rank, rank/2 or 1 (Civitai's LoRAs vary so), on the UNet's attention and
feed-forward layers, and saved as a kohya `.safetensors` file.

All LoRAs train at once: `StackedLoRA` adds K low-rank updates to the UNet's linear layers through forward hooks
and applies update k to the batch rows of LoRA k, so one UNet pass trains every LoRA on its own images (K separate
runs at a few images per step would spend their time in per-call overhead). The same hooks generate with many
LoRAs in one batch; a test checks them against diffusers' `load_lora_weights` of the saved files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from imagegem_hf.w2w.lora_io import LoRA, LoRAModule, save_lora

MICRO_BATCH = 32  # UNet rows per forward pass in training and generation
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
STYLE_ATTRIBUTES = ("warmth", "brightness")


@dataclass(frozen=True)
class UserStyle:
    """A toy user's colour grade, each axis in [−1, 1].

    Attributes:
        warmth: −1 tints every image blue (R × 0.6, B × 1.4), +1 red (R × 1.4, B × 0.6).
        brightness: −1 darkens every image (gamma 1.6), +1 brightens it (gamma 0.6).
    """

    warmth: float
    brightness: float

    def grade(self, image: Image.Image) -> Image.Image:
        """The image in this style (`imagegem_hf.toy.world.grade`)."""
        from imagegem_hf.toy.world import grade

        return grade(image, self.warmth, self.brightness)


def style_measures(images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """`{"warmth": R − B, "brightness": G}` of each image's background (channels in [0, 1]).

    A grade tints and exposes every pixel, but the prompt decides the subject's colour and nothing but
    "dark"/"light" of the background, so the background (`imagegem_hf.toy.world.background_colour`) shows the
    grade alone. Over 32 user LoRAs (4 prompts × 2 seeds each), the background's R − B ranks the users by their
    true warmth with Spearman 0.89 (split-half reliability 0.92), the whole image's mean R − B with 0.63 (0.65):
    the subject's colour, which the LoRAs shift a little each, drowns the tint. Brightness is read off the green
    channel, which the tint leaves alone: the mean of R, G and B moves with the tint wherever R or B clips, so a
    warmth edit "changed brightness" by that measure (debiasing against it shrank brightness's change per unit α
    3.6× over 64 LoRAs; against green, 14×).

    Example:
        ```python
        >>> from PIL import Image
        >>> from imagegem_hf.toy.loras import style_measures
        >>> style_measures([Image.new("RGB", (4, 4), (255, 128, 0))])["warmth"]
        array([1.])
        ```
    """
    from imagegem_hf.toy.world import background_colour

    background = np.stack([background_colour(image) for image in images]).astype(np.float64)
    return {"warmth": background[:, 0] - background[:, 2], "brightness": background[:, 1]}


@dataclass
class ToyLoRAConfig:
    """How the toy users' LoRAs are drawn and fine-tuned.

    Example:
        ```python
        >>> from imagegem_hf.toy.loras import ToyLoRAConfig
        >>> ToyLoRAConfig(n_loras=8).ranks
        (1, 2, 4, 8, 16)
        ```
    """

    n_loras: int = field(default=64, metadata={"help": "Number of users, one LoRA each."})
    correlation: float = field(default=0.6, metadata={"help": "Correlation of warmth and brightness across users."})
    ranks: tuple[int, ...] = field(default=(1, 2, 4, 8, 16), metadata={"help": "Ranks drawn uniformly per LoRA."})
    target_modules: tuple[str, ...] = field(
        default=TARGET_MODULES, metadata={"help": "UNet linear layers the LoRAs adapt (peft's name-suffix rule)."}
    )
    images_per_lora: int = field(default=32, metadata={"help": "Rendered training images per user."})
    batch_per_lora: int = field(default=2, metadata={"help": "Images of each LoRA per training step."})
    steps: int = field(default=200, metadata={"help": "Training steps (every LoRA trains in every step)."})
    learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the LoRA factors."})
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "AdamW (decoupled) weight decay of the LoRA factors. 1.0 keeps each style in fewer ranks "
            "(rank-16 LoRAs' samples follow their brightness with Spearman 0.80 instead of 0.05) but did not make "
            "debiasing work better (README)."
        },
    )
    empty_prompt_probability: float = field(
        default=0.2,
        metadata={"help": "Probability that a draw trains on the empty prompt, so the style holds under guidance."},
    )
    min_timestep: int = field(
        default=400,
        metadata={"help": "Timesteps are drawn from [min_timestep, T): a colour grade is decided at high noise."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the styles, the renders, the initial factors, the noise."})


def user_styles(n: int, correlation: float = 0.6, seed: int = 0) -> list[UserStyle]:
    """`n` styles with uniform marginals on [−1, 1] and the given correlation of the underlying normals.

    Example:
        ```python
        >>> from imagegem_hf.toy.loras import user_styles
        >>> styles = user_styles(4, seed=0)
        >>> all(-1 <= s.warmth <= 1 and -1 <= s.brightness <= 1 for s in styles)
        True
        ```
    """
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    z = rng.multivariate_normal([0.0, 0.0], [[1.0, correlation], [correlation, 1.0]], size=n)
    u = 2.0 * norm.cdf(z) - 1.0
    return [UserStyle(warmth=float(a), brightness=float(b)) for a, b in u]


def style_images(style: UserStyle, n: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """`n` toy world images graded in `style`, with their prompts (the grade is never named).

    Example:
        ```python
        >>> from imagegem_hf.toy.loras import UserStyle, style_images
        >>> images, prompts = style_images(UserStyle(warmth=1.0, brightness=0.0), 2)
        >>> len(images), images[0].size
        (2, (32, 32))
        ```
    """
    from imagegem_hf.toy.world import render, sample_world

    specs, prompts = sample_world(n, seed=seed)
    return [style.grade(render(spec)) for spec in specs], prompts


class StackedLoRA(torch.nn.Module):
    """K LoRAs on the same linear layers of a UNet, applied per batch row: row i gets LoRA `index[i]`.

    ΔW_k = (alpha_k / r_k) · up_k · down_k on every targeted layer; factors are stored padded to the largest rank
    with the unused components masked. Inside `with stacked.apply(unet, index)` the UNet computes
    W·x + ΔW_{index[i]}·x for batch row i (a batch that is a multiple of `len(index)`, as classifier-free guidance
    doubles it, repeats `index`).

    Args:
        layers: `{module name in the UNet: (out_features, in_features)}`.
        ranks: Rank of each LoRA.
        alphas: kohya alpha of each LoRA (scale alpha / rank).
        generator: Seeds the `down` factors (Kaiming-uniform, as peft); `up` starts at zero.
        shared_init: Start every LoRA from the same `down` factors (LoRA k from the first r_k rows).

    Example:
        ```python
        >>> import torch
        >>> from imagegem_hf.toy.loras import StackedLoRA
        >>> stacked = StackedLoRA({"attn.to_q": (8, 8)}, ranks=[1, 4], alphas=[1.0, 2.0])
        >>> stacked.to_lora(1).modules["unet.attn.to_q"].down.shape
        torch.Size([4, 8])
        ```
    """

    def __init__(
        self,
        layers: dict[str, tuple[int, int]],
        ranks: Sequence[int],
        alphas: Sequence[float],
        generator: torch.Generator | None = None,
        shared_init: bool = False,
    ) -> None:
        super().__init__()
        if len(ranks) != len(alphas):
            raise ValueError(f"Got {len(ranks)} ranks but {len(alphas)} alphas.")
        self.names = sorted(layers)
        self.ranks, self.alphas = [int(r) for r in ranks], [float(a) for a in alphas]
        width = max(self.ranks)
        self.register_buffer("mask", (torch.arange(width)[None, :] < torch.tensor(self.ranks)[:, None]).float())
        self.register_buffer("scale", torch.tensor([a / r for a, r in zip(self.alphas, self.ranks, strict=True)]))
        self.down = torch.nn.ParameterList()
        self.up = torch.nn.ParameterList()
        for name in self.names:
            n_out, n_in = layers[name]
            bound = 1.0 / np.sqrt(n_in)  # kaiming_uniform_(a=√5), peft's lora_A initialisation
            shape = (1 if shared_init else len(self.ranks), width, n_in)
            down = ((torch.rand(shape, generator=generator) * 2 - 1) * bound).expand(len(self.ranks), -1, -1).clone()
            self.down.append(torch.nn.Parameter(down))
            self.up.append(torch.nn.Parameter(torch.zeros(len(self.ranks), n_out, width)))
        self._index: torch.Tensor | None = None

    @classmethod
    def for_unet(
        cls,
        unet: torch.nn.Module,
        ranks: Sequence[int],
        alphas: Sequence[float],
        target_modules: Sequence[str] = TARGET_MODULES,
        generator: torch.Generator | None = None,
        shared_init: bool = False,
    ) -> StackedLoRA:
        """Trainable LoRAs on the UNet's linear layers whose names end with one of `target_modules`."""
        layers = {
            name: (module.out_features, module.in_features)
            for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules)
        }
        if not layers:
            raise ValueError(f"No linear layer of the UNet matches {list(target_modules)}.")
        return cls(layers, ranks, alphas, generator, shared_init)

    @classmethod
    def from_loras(cls, unet: torch.nn.Module, loras: Sequence[LoRA]) -> StackedLoRA:
        """Fixed LoRAs (any ranks and scales; UNet modules only) stacked for batched generation."""
        modules = dict(unet.named_modules())
        names = sorted({name for lora in loras for name in lora.modules})
        if any(not name.startswith("unet.") for name in names):
            raise ValueError("StackedLoRA applies UNet modules only; the LoRAs have text-encoder modules.")
        shapes = {}
        for name in names:
            layer = modules[name.removeprefix("unet.")]
            shapes[name.removeprefix("unet.")] = (layer.out_features, layer.in_features)
        ranks = [max([m.rank for m in lora.modules.values()], default=1) for lora in loras]
        stacked = cls(shapes, ranks, alphas=ranks).requires_grad_(False)
        for i, name in enumerate(stacked.names):
            stacked.down[i].zero_()
            for k, lora in enumerate(loras):
                module = lora.modules.get("unet." + name)
                if module is not None:
                    stacked.down[i][k, : module.rank] = module.down_2d()
                    stacked.up[i][k, :, : module.rank] = module.up_2d() * module.scale
        stacked.mask.fill_(1.0)
        return stacked

    @contextmanager
    def apply(self, unet: torch.nn.Module, index: torch.Tensor | Sequence[int]) -> Iterator[None]:
        """Within the block, batch row i of the UNet's input gets LoRA `index[i]`."""
        self._index = torch.as_tensor(index, dtype=torch.long)
        modules = dict(unet.named_modules())
        handles = [
            modules[name].register_forward_hook(self._hook(i)) for i, name in enumerate(self.names) if name in modules
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._index = None

    def _hook(self, position: int):
        def hook(module, inputs, output):
            x = inputs[0]
            rows = self._index.repeat(x.shape[0] // len(self._index))
            if len(rows) != x.shape[0]:
                raise ValueError(f"A batch of {x.shape[0]} rows does not fit {len(self._index)} LoRA indices.")
            down = self.down[position][rows] * self.mask[rows][..., None]  # (N, R, in)
            up = self.up[position][rows] * self.scale[rows][:, None, None]  # (N, out, R)
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.einsum("ntr,nor->nto", torch.einsum("nti,nri->ntr", flat, down), up)
            return output + delta.reshape(output.shape)

        return hook

    def to_lora(self, k: int) -> LoRA:
        """LoRA k as a `LoRA` (rank r_k, kohya alpha), with canonical `unet.` module names."""
        r = self.ranks[k]
        modules = {
            f"unet.{name}": LoRAModule(
                down=self.down[i][k, :r].detach().clone(),
                up=self.up[i][k, :, :r].detach().clone(),
                alpha=self.alphas[k],
            )
            for i, name in enumerate(self.names)
        }
        return LoRA(modules=modules)


def _encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    ids = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pipe.text_encoder(ids)[0]


def _pixels(images) -> torch.Tensor:
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def _training_pool(pipe, styles: Sequence[UserStyle], config: ToyLoRAConfig, show_progress: bool):
    """Latents `(K, P, c, h, w)` and text embeddings `(P + 1, tokens, width)`, the last one the empty prompt's: the
    same renders for every user, graded in each user's style."""
    images, prompts = style_images(UserStyle(0.0, 0.0), config.images_per_lora, seed=config.seed)
    latents = []
    for style in tqdm(styles, desc="Grade + encode user styles", disable=not show_progress):
        pixels = _pixels([style.grade(image) for image in images])
        latents.append(pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)
    return torch.stack(latents), _encode_prompts(pipe, [*prompts, ""])


def train_user_loras(
    pipe, styles: Sequence[UserStyle], config: ToyLoRAConfig | None = None, show_progress: bool = True
) -> tuple[list[LoRA], list[float]]:
    """Fine-tune one LoRA per style from the base pipeline's UNet, all in the same batches.

    All users start from the same seeded `down` factors (as a trainer's default seed would give) and every step
    draws the same `batch_per_lora` renders, noise and timesteps for all of them, each graded in its user's style:
    the LoRAs differ by their style only, not by their random draws. Each LoRA trains on ε-prediction of its own
    rows (the base weights stay frozen). With independent starts and draws, 100 steps leave the style buried in
    each LoRA's own noise: a direction learnt on 18 of 24 LoRAs then correlates −0.30 with the held-out LoRAs'
    warmth, against 0.91 with shared ones.

    A fifth of the draws (`empty_prompt_probability`) train on the empty prompt. A grade trained on prompted draws
    only is learnt for the conditional branch of classifier-free guidance, and guidance cancels it: such LoRAs
    denoise their own grade better (loss 0.050 on warm renders against 0.093 on cool ones at t = 300 for a warm
    user), and show it without guidance (warmth 0.21 against −0.03 for a cool user), but not at guidance 4 (24
    users: Spearman 0.10 between a user's warmth and the warmth of their samples, 0.36 with empty prompts). Draws
    use timesteps from `min_timestep` = 400 up, where the grade is decided (warm − cool warmth of samples from 7
    LoRAs: 0.146 and 0.082 for two pairs, against 0.104 and 0.054 with all timesteps). A learning rate of 3e-2
    diverged (loss 0.44 → 0.65 in 300 steps).

    Args:
        pipe: The base `StableDiffusionPipeline` (the toy world's, or any with 32×32 images).
        styles: One style per LoRA.
        config: Ranks, steps and learning rate (`ToyLoRAConfig`).
        show_progress: tqdm bars.

    Returns:
        `(loras, losses)`: one `LoRA` per style (kohya alphas, mixed ranks) and the mean loss per step.

    Example:
        ```python
        >>> from imagegem_hf.toy import load_toy_pipeline
        >>> from imagegem_hf.toy.loras import ToyLoRAConfig, train_user_loras, user_styles
        >>> config = ToyLoRAConfig(n_loras=4, steps=2)
        >>> loras, losses = train_user_loras(load_toy_pipeline(), user_styles(4), config)  # doctest: +SKIP
        ```
    """
    from diffusers import DDPMScheduler

    config = config or ToyLoRAConfig()
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    ranks = [int(r) for r in rng.choice(config.ranks, size=len(styles))]
    alphas = [float(rng.choice([r, r / 2, 1.0])) for r in ranks]
    stacked = StackedLoRA.for_unet(pipe.unet, ranks, alphas, config.target_modules, generator, shared_init=True)
    latents, embeddings = _training_pool(pipe, styles, config, show_progress)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(stacked.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    n_loras, pool = latents.shape[:2]
    owner = torch.arange(n_loras).repeat(config.batch_per_lora)  # row i·K + k: LoRA k's copy of draw i
    pipe.unet.requires_grad_(False)
    losses = []
    for _ in tqdm(range(config.steps), desc=f"Train {n_loras} user LoRAs", disable=not show_progress):
        # every LoRA sees the same images (in its own grade), noise and timesteps: LoRAs differ by their style only
        pick = torch.randint(0, pool, (config.batch_per_lora,), generator=generator)
        empty = torch.rand(config.batch_per_lora, generator=generator) < config.empty_prompt_probability
        prompt = torch.where(empty, pool, pick).repeat_interleave(n_loras)  # `pool` indexes the empty prompt
        pick = pick.repeat_interleave(n_loras)
        noise = torch.randn((config.batch_per_lora, *latents.shape[2:]), generator=generator)
        timesteps = torch.randint(
            config.min_timestep, scheduler.config.num_train_timesteps, (config.batch_per_lora,), generator=generator
        )
        noise, timesteps = noise.repeat_interleave(n_loras, dim=0), timesteps.repeat_interleave(n_loras)
        noisy = scheduler.add_noise(latents[owner, pick], noise, timesteps)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows in torch.arange(len(owner)).split(MICRO_BATCH):  # bounded memory: attention maps grow with rows
            with stacked.apply(pipe.unet, owner[rows]):
                prediction = pipe.unet(noisy[rows], timesteps[rows], embeddings[prompt[rows]]).sample
            loss = F.mse_loss(prediction, noise[rows], reduction="sum") / noise.numel()
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
    return [stacked.to_lora(k) for k in range(n_loras)], losses


def _base_fingerprint(pipe) -> str:
    digest = hashlib.sha256()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class UserLoRAs:
    """A toy LoRA collection on disk.

    Attributes:
        files: The kohya `.safetensors` files, one per user.
        styles: Each user's style.
        folder: Where they are (with `users.json`).
    """

    files: list[Path]
    styles: list[UserStyle]
    folder: Path


def default_cache_dir() -> Path:
    """Where toy LoRA collections are kept by default: `$HF_HOME/imagegem_hf/toy_user_loras`."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "imagegem_hf" / "toy_user_loras"


def user_lora_collection(
    pipe, folder: str | os.PathLike | None = None, config: ToyLoRAConfig | None = None, show_progress: bool = True
) -> UserLoRAs:
    """The toy users' LoRAs as kohya files in `folder`, trained on the first call and reused afterwards.

    `folder/users.json` records the config, the base pipeline's weight fingerprint and each user's style; a folder
    made with another config or base is retrained. By default the folder is named after both, under
    `default_cache_dir()`, so collections of different configs are kept side by side.

    Example:
        ```python
        >>> from imagegem_hf.toy import load_toy_pipeline
        >>> from imagegem_hf.toy.loras import user_lora_collection
        >>> collection = user_lora_collection(load_toy_pipeline(), "toy_loras")  # doctest: +SKIP
        >>> len(collection.files)  # doctest: +SKIP
        64
        ```
    """
    config = config or ToyLoRAConfig()
    key = {"config": json.loads(json.dumps(asdict(config))), "base": _base_fingerprint(pipe)}
    if folder is None:
        folder = default_cache_dir() / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(folder)
    manifest_path = folder / "users.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        files = [folder / name for name in manifest.get("files", [])]
        if {k: manifest.get(k) for k in key} == key and files and all(f.is_file() for f in files):
            return UserLoRAs(files=files, styles=[UserStyle(**s) for s in manifest["styles"]], folder=folder)
    styles = user_styles(config.n_loras, config.correlation, config.seed)
    loras, losses = train_user_loras(pipe, styles, config, show_progress)
    folder.mkdir(parents=True, exist_ok=True)
    files = [save_lora(lora, folder / f"user_{k:03d}.safetensors", format="kohya") for k, lora in enumerate(loras)]
    manifest = {
        **key,
        "files": [f.name for f in files],
        "styles": [asdict(s) for s in styles],
        "ranks": [max(m.rank for m in lora.modules.values()) for lora in loras],
        "loss_first_last": [losses[0], losses[-1]],
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return UserLoRAs(files=files, styles=styles, folder=folder)


@torch.no_grad()
def generate_with_loras(
    pipe,
    loras: Sequence[LoRA],
    lora_index: Sequence[int],
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    batch_size: int = MICRO_BATCH,
    show_progress: bool = False,
) -> list:
    """One image per row `(loras[lora_index[i]], prompts[i], seeds[i])`, many LoRAs per batch (`StackedLoRA`).

    Example:
        ```python
        >>> from imagegem_hf.toy.loras import generate_with_loras
        >>> images = generate_with_loras(pipe, [lora_a, lora_b], [0, 1], ["a circle"] * 2, [0, 0])  # doctest: +SKIP
        ```
    """
    if not len(lora_index) == len(prompts) == len(seeds):
        raise ValueError("Pass one LoRA index, prompt and seed per image.")
    stacked = StackedLoRA.from_loras(pipe.unet, loras)
    images = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"Generate with {len(loras)} LoRAs", disable=not show_progress):
        rows = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[rows]]
        with stacked.apply(pipe.unet, list(lora_index[rows])):
            out = pipe(
                list(prompts[rows]),
                generator=generators,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
        images.extend(out.images)
    return images
