"""`W2WEditXLPipeline`: the weight-space LoRA editor on Stable Diffusion XL (ImageGem's setting), and
`w2w_pipeline_from_base`, which builds either editor from a base model's components."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

from .pipeline_w2w import W2WEditMixin, W2WEditPipeline, _base_of


class W2WEditXLPipeline(W2WEditMixin, DiffusionPipeline, StableDiffusionXLLoraLoaderMixin):
    """Stable Diffusion XL with a weight-space LoRA editor (ImageGem's setting: SDXL, 30 steps, guidance 5).

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler: The SDXL components.
        weight_space: The `WeightSpace` of SDXL LoRAs.
        base_model: Path or repo id of the base pipeline (the card's `base_model`); by default the folder the UNet
            was loaded from.

    Example:
        ```python
        >>> from diffusers import StableDiffusionXLPipeline
        >>> from imagegem_hf.w2w import W2WEditXLPipeline, WeightSpace
        >>> repo = "stabilityai/stable-diffusion-xl-base-1.0"
        >>> xl = StableDiffusionXLPipeline.from_pretrained(repo)  # doctest: +SKIP
        >>> names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
        >>> pipe = W2WEditXLPipeline(**{k: xl.components[k] for k in names},
        ...                          weight_space=WeightSpace.from_pretrained("me/w2w-sdxl"))  # doctest: +SKIP
        ```
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        weight_space,
        base_model: str | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            weight_space=weight_space,
        )
        self.register_to_config(base_model=base_model or _base_of(unet))

    def _encode_prompt(self, pipe, prompt, negative_prompt, guidance):
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt,
            device=pipe._execution_device,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt,
        )
        call = {
            "prompt_embeds": positive,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
        if guidance:
            loop = {
                "prompt_embeds": torch.cat([negative, positive]),
                "add_text_embeds": torch.cat([negative_pooled, pooled]),
            }
        else:
            loop = {"prompt_embeds": positive, "add_text_embeds": pooled}
        return call, loop

    def _generator_pipeline(self) -> StableDiffusionXLPipeline:
        pipe = StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=self.scheduler,
        )
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe


def w2w_pipeline_from_base(base_model: str, weight_space, sdxl: bool = False) -> W2WEditPipeline | W2WEditXLPipeline:
    """A W2W edit pipeline made of a base Stable Diffusion 1.5 (or, with `sdxl`, SDXL) model's components and a
    weight space of the same base.

    Example:
        ```python
        >>> from imagegem_hf.w2w import WeightSpace, w2w_pipeline_from_base
        >>> space = WeightSpace.from_pretrained("me/w2w-sd15")  # doctest: +SKIP
        >>> pipe = w2w_pipeline_from_base("stable-diffusion-v1-5/stable-diffusion-v1-5", space)  # doctest: +SKIP
        ```
    """
    if sdxl:
        base = StableDiffusionXLPipeline.from_pretrained(base_model)
        names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
        return W2WEditXLPipeline(
            **{k: base.components[k] for k in names}, weight_space=weight_space, base_model=base_model
        )
    base = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None, requires_safety_checker=False)
    names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    return W2WEditPipeline(**{k: base.components[k] for k in names}, weight_space=weight_space, base_model=base_model)
