"""`PreferencePrototypeModel`: predict whether a user likes an image from their liked/disliked references.

Paper 003 ("Learning User Preferences for Image Generation Models", arXiv 2508.08220): an image-text-to-text VLM
reads a user's reference images (each answered with `+` or `-`) and a target image, with `L_p` learnable preference
prototypes prepended to its input embeddings, and scores `P(like)` = softmax over the like/dislike logits at the
last position.

The prototypes get attention-mask ones and the real tokens keep their mask, so padding stays masked (the published
code set the whole mask to ones); position ids are computed from that mask, so a left-padded row gives the same
logits as the same row unpadded. Qwen2-VL's 3-D rotary positions are those of its `get_rope_index`, shifted past the
prototypes. Backbones whose positions or masks cannot be laid out around the prototypes raise `NotImplementedError`
(`check_backbone_supported`).

This file and `configuration_preference_prototype.py` are also the model's Hub code: `save_pretrained` copies both
beside the weights (with an `auto_map` in `config.json`), so they import only the libraries and each other.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.utils import ModelOutput

from .configuration_preference_prototype import PreferencePrototypeConfig


@dataclass
class PreferencePrototypeOutput(ModelOutput):
    """Output of [`PreferencePrototypeModel`].

    Attributes:
        logits: `(batch, 2)` logits of the like and dislike tokens at the last position (`M⁺`, `M⁻`).
        p_like: `(batch,)` softmax probability of the like token over the two.
        prototype_attention: `(batch, num_prototypes)` attention from the target image's tokens to each prototype,
            averaged over layers, heads and target tokens (only with `output_prototype_attention=True`).
        target_prototype_attention: `(batch, layers, heads, seq, num_prototypes)` attention of every position to
            the prototypes (only with `output_prototype_attention=True`); rows outside `target_mask` are zero.
    """

    logits: torch.Tensor | None = None
    p_like: torch.Tensor | None = None
    prototype_attention: torch.Tensor | None = None
    target_prototype_attention: torch.Tensor | None = None


# backbones whose 3-D rotary positions (M-RoPE) come from `model.get_rope_index`, shifted past the prototypes
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# backbones that attend bidirectionally within images through `token_type_ids` (a prefix-LM mask laid out for the
# unprefixed sequence)
TOKEN_TYPE_MODEL_TYPES = ("gemma3", "gemma3n", "paligemma")


def check_backbone_supported(backbone_config) -> None:
    """Raise `NotImplementedError` for a backbone whose positions or mask `PreferencePrototypeModel` cannot lay out.

    Supported: backbones with 1-D rotary positions and a causal mask (LLaVA, LLaVA-NeXT, Idefics2, Idefics3/SmolVLM,
    ...) and the Qwen2-VL family (3-D M-RoPE positions from `get_rope_index`, shifted past the prototypes). Other
    M-RoPE backbones (Qwen3-VL, GLM-4V, ...) and `token_type_ids` prefix-LM backbones (Gemma 3, PaliGemma) raise.

    Example:
        ```python
        >>> from transformers import AutoConfig
        >>> check_backbone_supported(AutoConfig.for_model("gemma3"))
        Traceback (most recent call last):
        NotImplementedError: ...
        ```
    """
    model_type = getattr(backbone_config, "model_type", None)
    if model_type in TOKEN_TYPE_MODEL_TYPES:
        raise NotImplementedError(
            f"PreferencePrototypeModel does not support the {model_type!r} backbone: it attends bidirectionally "
            "within images through token_type_ids, which would need a prefix-LM mask built around the prepended "
            "prototypes. "
            "Use an Idefics2/Idefics3 (SmolVLM), LLaVA or Qwen2-VL backbone."
        )
    if model_type not in MROPE_MODEL_TYPES and _uses_multimodal_rope(backbone_config):
        raise NotImplementedError(
            f"PreferencePrototypeModel does not support the {model_type!r} backbone: its multimodal rotary positions "
            f"are only laid out around the prototypes for {', '.join(MROPE_MODEL_TYPES)}. Use one of those or an "
            "Idefics2/Idefics3 (SmolVLM) or LLaVA backbone."
        )


def backbone_class(backbone_config) -> type[PreTrainedModel] | None:
    """The `AutoModelForImageTextToText` class of a backbone config (None if it has none)."""
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING.get(type(backbone_config), None)
    return model_class[0] if isinstance(model_class, (list, tuple)) else model_class


def _uses_multimodal_rope(backbone_config) -> bool:
    """Whether the backbone numbers its tokens with multimodal rotary positions (an `mrope_section`, or a modeling
    module that computes them with `get_rope_index` as the Qwen-VL and GLM-4V families do)."""
    rope = getattr(backbone_config.get_text_config(), "rope_parameters", None) or {}
    if "mrope_section" in rope:
        return True
    model_class = backbone_class(backbone_config)
    if model_class is None:
        return False
    module = importlib.import_module(model_class.__module__)
    return any(isinstance(obj, type) and hasattr(obj, "get_rope_index") for obj in vars(module).values())


class PreferencePrototypePreTrainedModel(PreTrainedModel):
    """Base class wiring [`PreferencePrototypeConfig`] into `PreTrainedModel` (weights init, loading).

    The attention implementations it supports are those of its backbone's class; the prototypes stay float32 when
    the model is loaded in bfloat16 or float16 (`_keep_in_fp32_modules_strict`), so that small updates are not lost.
    """

    config_class = PreferencePrototypeConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["prototypes"]

    def _backbone_supports(self, attribute: str) -> bool:
        model_class = backbone_class(self.config.backbone_config)
        return bool(getattr(model_class, attribute, False))

    @property
    def _supports_sdpa(self) -> bool:
        return self._backbone_supports("_supports_sdpa")

    @property
    def _supports_flash_attn(self) -> bool:
        return self._backbone_supports("_supports_flash_attn")

    @property
    def _supports_flex_attn(self) -> bool:
        return self._backbone_supports("_supports_flex_attn")

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PreferencePrototypeModel) and module.prototypes is not None:
            nn.init.normal_(module.prototypes, std=self.config.prototype_init_std)


class PreferencePrototypeModel(PreferencePrototypePreTrainedModel):
    """An image-text-to-text backbone with learnable preference prototypes and a like/dislike head.

    Args:
        config: The model configuration; `like_token_id`/`dislike_token_id` must be set (use `from_backbone`).
        backbone: An already built backbone (e.g. pretrained) to wrap instead of building one from
            `config.backbone_config` with random weights.

    Example:
        ```python
        >>> from imagegem_hf.preference import PreferencePrototypeModel, PreferenceQuery, ReferencePair
        >>> from imagegem_hf.testing import random_images, tiny_vlm
        >>> backbone, processor = tiny_vlm()
        >>> model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=4)
        >>> a, b, c = random_images(3, size=16)
        >>> batch = builder([PreferenceQuery([ReferencePair(a, b, "a cat")], c, "a dog")])
        >>> model(**batch).p_like.shape
        torch.Size([1])
        ```
    """

    def __init__(self, config: PreferencePrototypeConfig, backbone: PreTrainedModel | None = None):
        check_backbone_supported(config.backbone_config)
        # `PreTrainedModel.__init__` resets the sub-configs' attention implementation; keep a given backbone's.
        backbone_attention = backbone.config._attn_implementation if backbone is not None else None
        super().__init__(config)
        if config.like_token_id is None or config.dislike_token_id is None:
            raise ValueError(
                "config.like_token_id / dislike_token_id are not set; build the model with "
                "PreferencePrototypeModel.from_backbone(backbone, processor) so they are read from the processor."
            )
        if backbone is None:
            backbone = AutoModelForImageTextToText.from_config(config.backbone_config)
        self.backbone = backbone
        self.backbone.set_attn_implementation(backbone_attention or self.config._attn_implementation)
        if config.num_prototypes > 0:
            # float32 whatever the backbone dtype (also when loading in bfloat16 creates the model in bfloat16)
            self.prototypes = nn.Parameter(
                torch.empty(config.num_prototypes, config.prototype_dim, dtype=torch.float32)
            )
        else:
            self.register_parameter("prototypes", None)
        self.post_init()

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel, processor, **config_kwargs):
        """Wrap a built (e.g. pretrained) backbone; the label token ids are read from its processor.

        Args:
            backbone: An `AutoModelForImageTextToText` model.
            processor: Its processor, with a chat template.
            **config_kwargs: Other [`PreferencePrototypeConfig`] fields (`num_prototypes`, `n_ref`, ...).

        Returns:
            `(model, builder)`: the model and the [`PreferenceSequenceBuilder`] that makes its inputs.
        """
        try:  # the input builder is part of imagegem_hf; this file also runs as Hub code without it
            from imagegem_hf.preference.sequence import PreferenceSequenceBuilder
        except ImportError as error:
            raise ImportError(
                "PreferencePrototypeModel.from_backbone builds its inputs with imagegem_hf's "
                "PreferenceSequenceBuilder; install imagegem_hf (`pip install imagegem_hf`) to wrap a new backbone."
            ) from error

        config = PreferencePrototypeConfig(backbone_config=backbone.config, **config_kwargs)
        builder = PreferenceSequenceBuilder.from_config(processor, config)
        config.like_token_id, config.dislike_token_id = builder.like_token_id, builder.dislike_token_id
        model = cls(config, backbone=backbone)
        if model.prototypes is not None:  # only the new parameter moves (a quantized backbone cannot); it stays fp32
            model.prototypes.data = model.prototypes.data.to(backbone.device)
        return model, builder

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def position_ids(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        start: torch.Tensor | int = 0,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of the unmasked tokens of a padded batch, numbered from `start` in each row.

        1-D positions count the unmasked tokens. Qwen2-VL's 3-D positions (temporal, height, width) come from the
        backbone's `get_rope_index` and are shifted by `start`: M-RoPE positions are translation invariant, so a
        sequence split in two parts gets the positions of the whole when the second starts where the first ended.

        Args:
            attention_mask: `(batch, seq)`, 0 on padding (either side).
            input_ids: `(batch, seq)` token ids (without the prototypes); needed for Qwen2-VL only.
            start: First position of each row, `(batch,)` or an int (the number of prototypes before the tokens).
            image_grid_thw: Qwen2-VL's image grids of the batch's images, in order.
            video_grid_thw: Qwen2-VL's video grids.

        Returns:
            `(positions, next_start)`: `(batch, seq)` or `(3, batch, seq)` positions (1 on padding) and the
            `(batch,)` position that a continuation of each row starts at.
        """
        mask = attention_mask.bool()
        if self.config.backbone_config.model_type in MROPE_MODEL_TYPES:
            if input_ids is None:
                raise ValueError("Qwen2-VL positions need input_ids (and image_grid_thw) to find the image tokens.")
            backbone_config = self.config.backbone_config
            token_types = torch.zeros_like(input_ids, dtype=torch.int)
            token_types[input_ids == backbone_config.image_token_id] = 1
            token_types[input_ids == backbone_config.video_token_id] = 2
            positions, _ = self.backbone.model.get_rope_index(
                input_ids=input_ids,
                mm_token_type_ids=token_types,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                attention_mask=attention_mask,
            )
            positions = positions.to(input_ids.device)
            start = torch.as_tensor(start, device=mask.device).reshape(-1, 1)
            positions = (positions + start).masked_fill(~mask, 1)
            next_start = positions.masked_fill(~mask, -1).amax(dim=(0, 2)) + 1
        else:
            positions = mask.long().cumsum(-1) - 1 + torch.as_tensor(start, device=mask.device).reshape(-1, 1)
            positions = positions.masked_fill(~mask, 1)
            next_start = positions.masked_fill(~mask, -1).amax(-1) + 1
        return positions, next_start

    def prepend_prototypes(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepend the prototypes; return `(inputs_embeds, attention_mask, position_ids, next_start)`.

        The prototypes get mask ones and positions `0 … L_p - 1`; the real mask is kept (padding stays masked) and
        the real tokens are numbered from `L_p` by [`position_ids`] (so padding does not shift them). `input_ids`
        and the image grids are needed for Qwen2-VL's 3-D positions only.
        """
        batch = inputs_embeds.shape[0]
        num = self.config.num_prototypes if self.prototypes is not None else 0
        positions, next_start = self.position_ids(attention_mask, input_ids, num, image_grid_thw, video_grid_thw)
        if num:
            prototypes = self.prototypes.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            inputs_embeds = torch.cat([prototypes, inputs_embeds], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones(batch, num), attention_mask], dim=1)
            prototype_positions = torch.arange(num, device=positions.device).expand(*positions.shape[:-1], num)
            positions = torch.cat([prototype_positions, positions], dim=-1)
        return inputs_embeds, attention_mask, positions, next_start

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_prototype_attention: bool = False,
        **backbone_inputs,
    ) -> PreferencePrototypeOutput:
        """Score the target of each row.

        A [`PairBatch`] (`prefix_*` / `target_*` inputs from `build_pair_batch`) is scored with `forward_pairs`,
        which runs each example's shared reference prefix once.

        Args:
            input_ids: `(batch, seq)` left-padded token ids from [`PreferenceSequenceBuilder`] (without the label).
            attention_mask: `(batch, seq)`; 0 on padding.
            target_mask: `(batch, seq)` bool mask of the target image's tokens (for the prototype attention).
            labels: Ignored here (the losses live in `losses.py` and the trainer); accepted so that a builder batch
                can be passed as `**batch`.
            output_prototype_attention: Also return the attention from the target tokens to the prototypes. Needs
                eager attention (`model.backbone.set_attn_implementation("eager")`).
            **backbone_inputs: The processor's image tensors (`pixel_values`, `pixel_attention_mask`,
                `image_grid_thw`, ...), passed to the backbone unchanged.

        Returns:
            [`PreferencePrototypeOutput`].
        """
        if "prefix_input_ids" in backbone_inputs:
            if output_prototype_attention:
                raise ValueError("output_prototype_attention needs full sequences, not a shared-prefix PairBatch.")
            logits = self.forward_pairs(**backbone_inputs)
            return PreferencePrototypeOutput(logits=logits, p_like=logits.softmax(-1)[:, 0])
        if input_ids is None:
            raise ValueError("Pass input_ids (a PreferenceSequenceBuilder batch) or a PairBatch.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("Inputs must be left-padded (the last column scored for every row); pad on the left.")
        if output_prototype_attention:
            if self.prototypes is None:
                raise ValueError("output_prototype_attention needs num_prototypes > 0.")
            implementation = self.backbone.config._attn_implementation
            if implementation != "eager":
                raise ValueError(
                    f"Attention weights need eager attention, the backbone uses {implementation!r}; call "
                    "model.backbone.set_attn_implementation('eager') first."
                )
        backbone_inputs.pop("mm_token_type_ids", None)  # laid out for the sequence without the prototypes
        inputs_embeds, full_mask, position_ids, _ = self.prepend_prototypes(
            self.get_input_embeddings()(input_ids),
            attention_mask,
            input_ids,
            backbone_inputs.get("image_grid_thw"),
            backbone_inputs.get("video_grid_thw"),
        )
        outputs = self.backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=full_mask,
            position_ids=position_ids,
            logits_to_keep=1,
            output_attentions=output_prototype_attention,
            **backbone_inputs,
        )
        label_ids = [self.config.like_token_id, self.config.dislike_token_id]
        logits = outputs.logits[:, -1, label_ids].float()
        result = PreferencePrototypeOutput(logits=logits, p_like=logits.softmax(-1)[:, 0])
        if output_prototype_attention:
            result.prototype_attention, result.target_prototype_attention = self._prototype_attention(
                outputs.attentions, target_mask if target_mask is not None else attention_mask.bool()
            )
        return result

    def forward_pairs(
        self, prefix_input_ids: torch.LongTensor, target_input_ids: torch.LongTensor, **inputs
    ) -> torch.Tensor:
        """Score both targets of each example, running the shared reference prefix once.

        The prefix (prototypes and reference turns, `B` rows) is encoded once with a KV cache, the cache is repeated
        for the liked and disliked target turns (`2·B` rows) and the targets are run on top of it; attention masks
        and position ids continue across the two parts, so the logits equal those of the full sequences.

        Args:
            prefix_input_ids: `(B, Lp)` padded reference turns (from `build_pair_batch`: right-padded, which
                lets the prefix run with causal attention only; left padding works too).
            target_input_ids: `(2B, Lt)` left-padded target turns without the label.
            **inputs: `prefix_*` and `target_*` processor outputs (`prefix_attention_mask`, `prefix_pixel_values`,
                `target_attention_mask`, `target_pixel_values`, ...).

        Returns:
            `(2B, 2)` like/dislike logits: the `B` liked targets, then the `B` disliked ones.
        """
        if self.backbone.is_activation_checkpointing and self.training:
            raise ValueError("The shared-prefix path needs a KV cache, which gradient checkpointing disables.")
        prefix = {k.removeprefix("prefix_"): v for k, v in inputs.items() if k.startswith("prefix_")}
        target = {k.removeprefix("target_"): v for k, v in inputs.items() if k.startswith("target_")}
        prefix_mask, target_mask = prefix.pop("attention_mask"), target.pop("attention_mask")
        prefix.pop("mm_token_type_ids", None), target.pop("mm_token_type_ids", None)
        embeds, prefix_mask, positions, next_start = self.prepend_prototypes(
            self.get_input_embeddings()(prefix_input_ids),
            prefix_mask,
            prefix_input_ids,
            prefix.get("image_grid_thw"),
            prefix.get("video_grid_thw"),
        )
        # a right-padded prefix needs no mask: causal attention alone keeps its real tokens off the padding (which
        # the targets mask out), and the unmasked causal path is about twice as fast
        right_padded = bool((prefix_mask[:, 1:] <= prefix_mask[:, :-1]).all())
        cache = self.backbone(
            inputs_embeds=embeds,
            attention_mask=None if right_padded else prefix_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **prefix,
        ).cache
        cache.batch_repeat_interleave(2)
        prefix_mask = prefix_mask.repeat_interleave(2, dim=0)
        target_positions, _ = self.position_ids(
            target_mask,
            target_input_ids,
            next_start.repeat_interleave(2),
            target.get("image_grid_thw"),
            target.get("video_grid_thw"),
        )
        logits = (
            self.backbone(
                inputs_embeds=self.get_input_embeddings()(target_input_ids),
                attention_mask=torch.cat([prefix_mask, target_mask], dim=1),
                position_ids=target_positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **target,
            )
            .logits[:, -1, [self.config.like_token_id, self.config.dislike_token_id]]
            .float()
        )
        return torch.cat([logits[0::2], logits[1::2]], dim=0)

    def _prototype_attention(
        self, attentions: tuple[torch.Tensor, ...], target_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num = self.config.num_prototypes
        # (batch, layers, heads, seq, prototypes) for the real positions only
        stacked = torch.stack([a[:, :, num:, :num] for a in attentions], dim=1).float()
        keep = target_mask.to(stacked.device)[:, None, None, :, None]
        per_token = stacked * keep
        count = keep.sum(dim=3).clamp(min=1)
        summary = per_token.sum(dim=3) / count  # (batch, layers, heads, prototypes)
        return summary.mean(dim=(1, 2)), per_token


# `save_pretrained` writes `auto_map` and copies this file and the configuration's beside the weights, so that
# `AutoModel.from_pretrained(folder_or_repo, trust_remote_code=True)` works where imagegem_hf is not installed
PreferencePrototypeModel.register_for_auto_class("AutoModel")
