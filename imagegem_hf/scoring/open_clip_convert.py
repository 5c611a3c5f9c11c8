"""Convert an open_clip ViT state dict (e.g. the HPSv2 ViT-H-14 checkpoints) into a transformers `CLIPModel`.

open_clip and transformers implement the same CLIP architecture with different parameter names and layouts:
open_clip fuses the attention query/key/value into one `in_proj_weight` and stores the two projections as
`(width, embed_dim)` matrices applied as `x @ proj`, where transformers keeps separate `q/k/v` linears and
`nn.Linear` projections (`weight = proj.T`). The mapping below covers open_clip's standard `CLIP` class
(`VisionTransformer` image tower with a class token, built-in text tower), which is what HPSv2 ships.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)

# Buffers open_clip may store that carry no learned weights (the causal text mask, rebuilt by transformers).
NON_WEIGHT_KEYS = ("attn_mask",)

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_LEVEL_RENAMES = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def vit_h_14_config():
    """The transformers `CLIPConfig` of open_clip's `ViT-H-14` (the HPSv2 / HPSv2.1 backbone).

    Vision: 224² images, 14² patches, width 1280, 32 layers, 16 heads. Text: 77 tokens, width 1024, 24 layers,
    16 heads. Both towers use exact GELU and LayerNorm eps 1e-5; the joint embedding is 1024-d.

    Example:
        ```python
        >>> from imagegem_hf.scoring.open_clip_convert import vit_h_14_config
        >>> vit_h_14_config().projection_dim
        1024
        ```
    """
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=1024,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=1024,
        ),
        projection_dim=1024,
    )


def unwrap_open_clip_checkpoint(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The model state dict inside an open_clip training checkpoint.

    Accepts either a plain state dict or a checkpoint dict with a `"state_dict"` entry (the layout of the HPSv2
    files), and strips the `"module."` prefix that DistributedDataParallel training adds.

    Raises:
        ValueError: The checkpoint holds no tensors in a recognised layout.
    """
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"Expected a state dict of tensors, got {type(state).__name__} under 'state_dict'.")
    tensors = {
        (key[len("module.") :] if key.startswith("module.") else key): value
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    if not tensors:
        raise ValueError("The checkpoint contains no tensors; is it an open_clip model checkpoint?")
    return tensors


def convert_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and reshape an open_clip ViT `CLIP` state dict into transformers `CLIPModel` keys.

    Args:
        state_dict: open_clip parameter names (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`,
            `text_projection`, ...), without a `module.` prefix (see `unwrap_open_clip_checkpoint`).

    Returns:
        A state dict for `transformers.CLIPModel.load_state_dict`.

    Raises:
        ValueError: A key is neither mapped nor a known non-weight buffer (the checkpoint is not an open_clip ViT
            `CLIP` with the built-in text tower, e.g. a `CustomTextCLIP`, which needs its own mapping).

    Example:
        ```python
        >>> from imagegem_hf.scoring.open_clip_convert import convert_open_clip_state_dict
        >>> sd = convert_open_clip_state_dict({"visual.proj": torch.ones(4, 2)})
        >>> sd["visual_projection.weight"].shape
        torch.Size([2, 4])
        ```
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in NON_WEIGHT_KEYS:
            continue
        if key in _TOP_LEVEL_RENAMES:
            converted[_TOP_LEVEL_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.t().contiguous()
        elif (match := _BLOCK.match(key)) is not None:
            tower = "vision_model" if match.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{match.group(2)}."
            rest = match.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    converted[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            elif rest in _BLOCK_RENAMES:
                converted[prefix + _BLOCK_RENAMES[rest]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} open_clip keys have no transformers CLIPModel counterpart (first: {unknown[:5]}). Only "
            "open_clip's standard ViT `CLIP` (class-token pooling, built-in text tower) can be converted."
        )
    return converted


def open_clip_to_clip_model(state_dict: Mapping[str, torch.Tensor], config=None):
    """Build a transformers `CLIPModel` holding the weights of an open_clip ViT `CLIP` state dict.

    Args:
        state_dict: An open_clip state dict or training checkpoint (see `unwrap_open_clip_checkpoint`).
        config: The target `transformers.CLIPConfig` (or its dict). Defaults to `vit_h_14_config()`. The number of
            attention heads and the activation cannot be read from weight shapes, so pass the config matching the
            open_clip model name.

    Returns:
        A `CLIPModel` in eval mode.

    Raises:
        ValueError: Keys cannot be mapped, or the weight shapes do not fit `config` (the message names the
            mismatching parameters).

    Example:
        ```python
        >>> import torch
        >>> from imagegem_hf.scoring.open_clip_convert import open_clip_to_clip_model
        >>> checkpoint = torch.load("HPS_v2.1_compressed.pt", map_location="cpu", weights_only=True)  # doctest: +SKIP
        >>> model = open_clip_to_clip_model(checkpoint)  # doctest: +SKIP
        ```
    """
    from transformers import CLIPConfig, CLIPModel

    if config is None:
        config = vit_h_14_config()
    elif isinstance(config, Mapping):
        config = CLIPConfig(**config)
    converted = convert_open_clip_state_dict(unwrap_open_clip_checkpoint(state_dict))
    with torch.device("meta"):  # shapes only: the check costs no memory, even for ViT-H-14
        expected = CLIPModel(config).state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs config {tuple(expected[key].shape)}"
        for key, value in converted.items()
        if key in expected and tuple(expected[key].shape) != tuple(value.shape)
    ]
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if mismatched or missing or unexpected:
        raise ValueError(
            "The open_clip weights do not fit the CLIP config (pass the matching `config`/`clip_config`). "
            f"Shape mismatches: {mismatched[:3]}; missing: {missing[:3]}; unexpected: {unexpected[:3]}."
        )
    model = CLIPModel(config)
    model.load_state_dict(converted, assign=True)
    return model.eval()
