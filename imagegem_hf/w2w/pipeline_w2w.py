"""`W2WEditPipeline`: generate with a LoRA edited along a weight-space direction, one image per strength.

ImageGem Figures 4, 11 and 12: the same prompt and seed, the user's LoRA moved by α·v for a range of strengths α,
shown side by side. The pipeline holds the Stable Diffusion 1.5 components plus a `WeightSpace`, edits the LoRA in
the space, injects it with diffusers' own `load_lora_weights`, and denoises with the standard Stable Diffusion
loop. Optional delayed injection uses the unedited LoRA (UNet and text encoders) for the early (high-noise) steps
and the edited one once the timestep is at or below a threshold, which keeps the layout of the unedited image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw

from imagegem_hf.hub import card_license, hub_repo_id, render_card
from imagegem_hf.w2w.space import LoRAItem, WeightSpace

EDIT_ADAPTER = "w2w_edit"
BASE_ADAPTER = "w2w_base"


@dataclass
class W2WEditOutput(BaseOutput):
    """Output of `W2WEditPipeline`.

    Attributes:
        images: One image per strength, in the order of `strengths`.
        grid: The images side by side, each captioned with its strength.
        strengths: The strengths used.
    """

    images: list[Image.Image]
    grid: Image.Image
    strengths: list[float]


def image_grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, rows: int = 1) -> Image.Image:
    """Paste equally sized images into a `rows`-row grid, with an optional caption strip under each image.

    Example:
        ```python
        >>> from imagegem_hf.testing import random_images
        >>> from imagegem_hf.w2w.pipeline_w2w import image_grid
        >>> image_grid(random_images(4, size=16), ["a", "b", "c", "d"], rows=2).size
        (32, 56)
        ```
    """
    if not images:
        raise ValueError("image_grid needs at least one image.")
    cols = -(-len(images) // rows)
    width, height = images[0].size
    strip = 12 if captions else 0
    grid = Image.new("RGB", (cols * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * width, (i // cols) * (height + strip)
        grid.paste(image.convert("RGB").resize((width, height)), (x, y))
        if captions:
            draw.text((x + 1, y + height), captions[i], fill="black")
    return grid


def _base_of(unet) -> str | None:
    """The base pipeline a UNet was loaded from (its config's `_name_or_path` without the `unet/` subfolder): the
    repo id for a Hub download, else the folder; None for a UNet built in code."""
    path = getattr(unet.config, "_name_or_path", None) or None
    if path is not None and Path(path).name == "unet":
        path = Path(path).parent.as_posix()
    return hub_repo_id(path) or path


class _W2WEditBase(DiffusionPipeline):
    """What the SD 1.5 and SDXL editing pipelines share: edit, inject, denoise per strength, grid."""

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' `save_pretrained`, plus a model card `README.md` (see `model_card`)."""
        super().save_pretrained(save_directory, **kwargs)
        Path(save_directory, "README.md").write_text(self.model_card(), encoding="utf-8")

    def model_card(self) -> str:
        """The pipeline's card: `base_model` (the base pipeline's repo id), `library_name: diffusers`, the base's
        license, text-to-image tags and a usage snippet for the saved folder."""
        base_path = self.config.base_model
        return render_card(
            "w2w_pipeline_card.md",
            pipeline_class=type(self).__name__,
            base_model=hub_repo_id(base_path),
            base_path=base_path,
            license=card_license(base_path),
            sdxl=isinstance(self, StableDiffusionXLLoraLoaderMixin),
            n_models=self.weight_space.config.n_models,
            n_components=self.weight_space.n_components,
        )

    def _generator_pipeline(self) -> DiffusionPipeline:
        raise NotImplementedError

    def load_edited_lora(self, lora: LoRAItem, direction, strength: float, adapter_name: str = EDIT_ADAPTER) -> None:
        """Edit `lora` by `strength` along `direction` (or several) and inject it as adapter `adapter_name`."""
        edited = self.weight_space.edit(lora, direction, strength)
        unet_only = all(name.startswith("unet.") for name in edited.modules)  # text encoders get no keys
        verbosity = diffusers_logging.get_verbosity()
        if unet_only:  # diffusers warns that the text encoder got no LoRA keys, which is expected here
            diffusers_logging.set_verbosity_error()
        try:
            self.load_lora_weights(edited.to_diffusers_state_dict(), adapter_name=adapter_name)
        finally:
            diffusers_logging.set_verbosity(verbosity)

    def _unload(self) -> None:
        loaded = {name for names in self.get_list_adapters().values() for name in names}
        names = [name for name in (EDIT_ADAPTER, BASE_ADAPTER) if name in loaded]
        if names:
            self.delete_adapters(names)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        lora: LoRAItem,
        direction,
        strengths: Sequence[float] = (-2.0, 0.0, 2.0),
        seed: int = 0,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        lora_scale: float = 1.0,
        injection_timestep: int | None = None,
        grid_rows: int = 1,
    ) -> W2WEditOutput:
        """Generate one image per strength, all from the same seed, and a captioned grid.

        Args:
            prompt: The text prompt.
            lora: The user's LoRA (file, `LoRA` or vector of the space); it is rank-reduced like the space.
            direction: A `Direction` or unit vector (or a list of them, then each strength is applied to all;
                use `WeightSpace.edit` for per-direction strengths).
            strengths: Edit strengths α (θ + α·v); 0 reproduces the reduced, unedited LoRA.
            seed: The seed shared by all images.
            num_inference_steps: Denoising steps (ImageGem: 30).
            guidance_scale: Classifier-free guidance (ImageGem: 5).
            negative_prompt: Optional negative prompt.
            height, width: Image size (default: the UNet's sample size × the VAE factor).
            lora_scale: Adapter weight of the injected LoRA (ImageGem: 1).
            injection_timestep: If set, the unedited LoRA is used while the timestep is above this value and the
                edited one from the first step whose timestep is ≤ it (delayed injection, weights2weights' rule).
                Text-encoder modules of the LoRA follow the same switch: the prompt is encoded with both LoRAs
                and the edited embeddings replace the unedited ones at the switch.
            grid_rows: Rows of the grid.

        Returns:
            `W2WEditOutput` with `images`, `grid` and `strengths`. LoRA weights are unloaded afterwards.
        """
        generator_pipe = self._generator_pipeline()
        directions = direction if isinstance(direction, (list, tuple)) else [direction]
        images = []
        try:
            for strength in strengths:
                self._unload()
                self.load_edited_lora(lora, directions, [strength] * len(directions), EDIT_ADAPTER)
                inputs: dict = {"prompt": prompt, "negative_prompt": negative_prompt}
                callback, tensor_inputs = None, None
                if injection_timestep is None:
                    self.set_adapters(EDIT_ADAPTER, lora_scale)
                else:
                    self.load_edited_lora(lora, directions, [0.0] * len(directions), BASE_ADAPTER)
                    self.scheduler.set_timesteps(num_inference_steps)
                    edited_from_start = bool(self.scheduler.timesteps[0] <= injection_timestep)
                    prompts = {}  # the text encoders run once per adapter: their edits apply with the UNet's
                    for adapter in (BASE_ADAPTER, EDIT_ADAPTER):
                        self.set_adapters(adapter, lora_scale)
                        prompts[adapter] = self._encode_prompt(
                            generator_pipe, prompt, negative_prompt, guidance_scale > 1.0
                        )
                    first = EDIT_ADAPTER if edited_from_start else BASE_ADAPTER
                    self.set_adapters(first, lora_scale)
                    inputs = prompts[first][0]
                    loop_tensors = prompts[EDIT_ADAPTER][1]
                    callback = self._injection_callback(injection_timestep, lora_scale, loop_tensors)
                    tensor_inputs = list(loop_tensors)
                generator = torch.Generator(device="cpu").manual_seed(seed)
                result = generator_pipe(
                    **inputs,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    generator=generator,
                    callback_on_step_end=callback,
                    **({"callback_on_step_end_tensor_inputs": tensor_inputs} if tensor_inputs else {}),
                )
                images.append(result.images[0])
        finally:
            self.unload_lora_weights()  # leave the base model as it was (no peft wrappers left behind)
        captions = [f"a={s:g}" for s in strengths]
        grid = image_grid(images, captions, rows=grid_rows)
        return W2WEditOutput(images=images, grid=grid, strengths=list(strengths))

    def _encode_prompt(
        self, pipe: DiffusionPipeline, prompt: str, negative_prompt: str | None, guidance: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Encode the prompt with the active adapters: `(pipeline call kwargs, the denoising loop's tensors)`."""
        raise NotImplementedError

    def _injection_callback(self, threshold: int, lora_scale: float, edited_tensors: dict[str, torch.Tensor]):
        """Switch the UNet to the edited adapter and the loop to the edited text embeddings before the first step
        whose timestep is ≤ `threshold` (weights2weights' rule)."""

        def switch(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            timesteps = pipe.scheduler.timesteps
            if step + 1 < len(timesteps) and timesteps[step] > threshold >= timesteps[step + 1]:
                self.set_adapters(EDIT_ADAPTER, lora_scale)
                callback_kwargs.update(edited_tensors)
            return callback_kwargs

        return switch


class W2WEditPipeline(_W2WEditBase, StableDiffusionLoraLoaderMixin):
    """Stable Diffusion 1.5 with a weight-space LoRA editor (weights2weights, ImageGem §4.3).

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: The Stable Diffusion 1.5 components.
        weight_space: The `WeightSpace` the LoRA and the directions live in (same base model as the UNet).
        base_model: Path or repo id of the base pipeline the components come from (the card's `base_model`);
            by default the folder the UNet was loaded from.

    Example:
        ```python
        >>> from diffusers import StableDiffusionPipeline
        >>> from imagegem_hf.w2w import Direction, W2WEditPipeline, WeightSpace
        >>> repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
        >>> sd = StableDiffusionPipeline.from_pretrained(repo)  # doctest: +SKIP
        >>> parts = {k: sd.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        >>> pipe = W2WEditPipeline(**parts, weight_space=WeightSpace.from_pretrained("me/w2w-sd15"))  # doctest: +SKIP
        >>> out = pipe("a portrait", lora="user.safetensors", direction=Direction.load("realistic.safetensors"),
        ...            strengths=[-2, 0, 2, 4], seed=0)  # doctest: +SKIP
        >>> out.grid.save("grid.png")  # doctest: +SKIP
        ```
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self, vae, text_encoder, tokenizer, unet, scheduler, weight_space: WeightSpace, base_model: str | None = None
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            weight_space=weight_space,
        )
        self.register_to_config(base_model=base_model or _base_of(unet))

    def _encode_prompt(self, pipe, prompt, negative_prompt, guidance):
        positive, negative = pipe.encode_prompt(prompt, pipe._execution_device, 1, guidance, negative_prompt)
        loop = torch.cat([negative, positive]) if guidance else positive
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}, {"prompt_embeds": loop}

    def _generator_pipeline(self) -> StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe


class W2WEditXLPipeline(_W2WEditBase, StableDiffusionXLLoraLoaderMixin):
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
        weight_space: WeightSpace,
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


def w2w_pipeline_from_base(
    base_model: str, weight_space: WeightSpace, sdxl: bool = False
) -> W2WEditPipeline | W2WEditXLPipeline:
    """A W2W edit pipeline made of a base Stable Diffusion 1.5 (or, with `sdxl`, SDXL) model's components and a
    weight space of the same base.

    Example:
        ```python
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


def strengths_grid(low: float, high: float, count: int) -> list[float]:
    """`count` evenly spaced strengths from `low` to `high` (always including 0 when it lies in the range)."""
    values = np.linspace(low, high, count).tolist()
    if low < 0 < high and not any(abs(v) < 1e-9 for v in values):
        values = sorted([*values, 0.0])
    return [round(float(v), 6) for v in values]
