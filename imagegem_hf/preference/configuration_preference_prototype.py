"""`PreferencePrototypeConfig`: the configuration of a `PreferencePrototypeModel`.

The model (paper 003, "Learning User Preferences for Image Generation Models") wraps any image-text-to-text VLM
(`backbone_config` is that VLM's config) and prepends `num_prototypes` learnable preference prototypes to its input
embeddings. A user's liked/disliked reference images are shown in context, then a target image; the model predicts
the like or dislike token at the last position.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class PreferencePrototypeConfig(PreTrainedConfig):
    r"""Configuration of a [`PreferencePrototypeModel`].

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the image-text-to-text backbone (anything `AutoModelForImageTextToText.from_config` builds:
            Idefics2, SmolVLM/Idefics3, LLaVA, Qwen2-VL ...). A dict needs a `model_type`; defaults to Idefics2
            (the paper's backbone).
        num_prototypes (`int`, *optional*, defaults to 10):
            Number of learnable preference prototypes `L_p` prepended to the input embeddings (0 disables them).
        like_token (`str`, *optional*, defaults to `"+"`):
            The answer that means "like"; it must tokenize to a single token after the assistant prompt.
        dislike_token (`str`, *optional*, defaults to `"-"`):
            The answer that means "dislike"; single token, different from `like_token`.
        like_token_id (`int`, *optional*):
            Token id of `like_token` as it appears after the assistant prompt (resolved from the processor by
            [`PreferenceSequenceBuilder`]; required before the model can be built).
        dislike_token_id (`int`, *optional*):
            Token id of `dislike_token`, resolved likewise.
        n_ref (`int`, *optional*, defaults to 8):
            Number of reference pairs (one liked and one disliked image) per query, `N_ref`.
        max_prompt_chars (`int`, *optional*, defaults to 100):
            Generation prompts shown next to each image are cut to this many characters.
        use_prompt (`bool`, *optional*, defaults to `True`):
            Show each image's generation prompt ("The prompt is '...' Score for this image?").
        prototype_init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the prototypes.

    Example:
        ```python
        >>> from imagegem_hf.preference import PreferencePrototypeConfig
        >>> from imagegem_hf.testing import tiny_vlm
        >>> backbone, processor = tiny_vlm()
        >>> config = PreferencePrototypeConfig(backbone_config=backbone.config, num_prototypes=4)
        >>> config.num_prototypes
        4
        ```
    """

    model_type = "preference_prototype"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="idefics2")}

    backbone_config: dict | PreTrainedConfig | None = None
    num_prototypes: int = 10
    like_token: str = "+"
    dislike_token: str = "-"
    like_token_id: int | None = None
    dislike_token_id: int | None = None
    n_ref: int = 8
    max_prompt_chars: int = 100
    use_prompt: bool = True
    prototype_init_std: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_prototypes < 0:
            raise ValueError(f"num_prototypes must be >= 0, got {self.num_prototypes}.")
        if self.n_ref < 1:
            raise ValueError(f"n_ref must be >= 1, got {self.n_ref}.")
        if self.like_token == self.dislike_token:
            raise ValueError(f"like_token and dislike_token must differ, both are {self.like_token!r}.")
        if not isinstance(self.use_prompt, bool):
            raise ValueError(
                f"use_prompt must be a bool, got {self.use_prompt!r} ({type(self.use_prompt).__name__}); "
                "a string such as '0' would be truthy."
            )

    @property
    def prototype_dim(self) -> int:
        """Hidden size of the backbone's language model (the width of each prototype)."""
        return self.backbone_config.get_text_config().hidden_size


# `save_pretrained` writes `auto_map` and copies this file beside the config (loadable with trust_remote_code=True)
PreferencePrototypeConfig.register_for_auto_class()
