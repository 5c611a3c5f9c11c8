"""`W2WEditPipeline`: generate with a LoRA edited along a weight-space direction, one image per strength.

ImageGem Figures 4, 11 and 12: the same prompt and seed, the user's LoRA moved by α·v for a range of strengths α,
shown side by side. The pipeline holds the Stable Diffusion 1.5 components plus a `WeightSpace`, edits the LoRA in
the space, injects it with diffusers' own `load_lora_weights`, and denoises with the standard Stable Diffusion
loop. Optional delayed injection uses the unedited LoRA (UNet and text encoders) for the early (high-noise) steps
and the edited one once the timestep is at or below a threshold, which keeps the layout of the unedited image.

This file is also the pipeline's Hub code: `save_pretrained` copies it (and the weight space's modules) into the
saved folder, so it imports only the libraries and defines one `DiffusionPipeline` (the SDXL variant lives in
`pipeline_w2w_xl.py`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from PIL import Image, ImageDraw

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


def _hub():
    """imagegem_hf's Hub helpers (card templates), imported when a pipeline is saved: this file is also the
    pipeline's Hub code, which loads and runs with diffusers alone."""
    try:
        return importlib.import_module("imagegem_hf.hub")
    except ImportError as error:
        raise ImportError(
            "Saving a W2W pipeline writes its model card from imagegem_hf's templates; install imagegem_hf "
            "(`pip install imagegem_hf`)."
        ) from error


def _base_of(unet) -> str | None:
    """The base pipeline a UNet was loaded from (its config's `_name_or_path` without the `unet/` subfolder: a Hub
    snapshot path or a folder); None for a UNet built in code."""
    path = getattr(unet.config, "_name_or_path", None) or None
    if path is not None and Path(path).name == "unet":
        path = Path(path).parent.as_posix()
    return path


class W2WEditMixin:
    """What the SD 1.5 and SDXL editing pipelines share: edit, inject, denoise per strength, grid, and saving and
    loading with the pipeline's and the weight space's code beside the weights."""

    def _generator_pipeline(self) -> DiffusionPipeline:
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the components in diffusers' layout, this pipeline's code at the top of the folder and the weight
        space's code in `weight_space/`, with `model_index.json` pointing at both, and a model card, so that
        `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` loads it with diffusers alone.

        Args:
            save_directory: The folder (laid out like the Hub repo).
            **kwargs: Passed to `DiffusionPipeline.save_pretrained`; with `push_to_hub=True` the complete folder
                (code and card included) is uploaded to `repo_id` (default: the folder's name).
        """
        push_to_hub = kwargs.pop("push_to_hub", False)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "private", "token", "commit_message") if k in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        pipeline_file = inspect.getfile(type(self))
        for code in [pipeline_file, *get_relative_import_files(pipeline_file)]:
            shutil.copyfile(code, folder / Path(code).name)
        index["_class_name"] = [Path(pipeline_file).stem, type(self).__name__]
        # the weight space saves its own code beside its weights (`WeightSpace.save_pretrained`)
        space_file = Path(inspect.getfile(type(self.weight_space)))
        index["weight_space"] = [space_file.stem, type(self.weight_space).__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(self.model_card(), encoding="utf-8")
        if push_to_hub:
            self.push_to_hub(hub_kwargs.pop("repo_id", folder.name), **hub_kwargs)

    def model_card(self) -> str:
        """The pipeline's card: `base_model` (the base pipeline's repo id), `library_name: diffusers`, the base's
        license, text-to-image tags and a usage snippet for the saved folder."""
        hub = _hub()
        base_path = self.config.get("base_model")
        return hub.render_card(
            "w2w_pipeline_card.md",
            pipeline_class=type(self).__name__,
            pipeline_file=Path(inspect.getfile(type(self))).name,
            base_model=hub.hub_repo_id(base_path),
            base_path=base_path,
            license=hub.card_license(base_path),
            sdxl="text_encoder_2" in self.components,
            n_models=self.weight_space.config.n_models,
            n_components=self.weight_space.n_components,
            vector_length=self.weight_space.vector_length,
        )

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        token: str | None = None,
        commit_message: str | None = None,
        **_: Any,
    ) -> str:
        """Save the pipeline (code and card included) to a temporary folder and upload it to `repo_id`.

        Returns:
            The URL of the commit.
        """
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "pipeline")
            return _hub().push_folder(
                Path(tmp) / "pipeline", repo_id, private=private, commit_message=commit_message, token=token
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **components: Any):
        """Load a saved pipeline with this library's classes, without running the code saved in the folder.

        The components listed in `model_index.json` are loaded from their subfolders; those whose code is saved
        beside them (the weight space) are built with the class of the same name from the library this pipeline
        class belongs to. A pipeline class that was itself loaded as Hub code defers to diffusers' loader
        (`DiffusionPipeline.from_pretrained`, which needs `trust_remote_code=True`).

        Args:
            pretrained_model_name_or_path: A folder written by `save_pretrained` or a Hub repo id.
            **components: Already built components to use instead of loading them (e.g. `unet=...`).

        Returns:
            The pipeline.

        Example:
            ```python
            >>> from imagegem_hf.w2w import W2WEditPipeline
            >>> pipe = W2WEditPipeline.from_pretrained("demo_output/w2w/pipeline")  # doctest: +SKIP
            ```
        """
        library = importlib.import_module(cls.__module__.split(".")[0])
        if getattr(library, cls.__name__, None) is not cls:
            return super().from_pretrained(pretrained_model_name_or_path, **components)
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained_model_name_or_path)))
        index = cls.load_config(folder)
        expected, _ = cls._get_signature_keys(cls)
        base_model = components.pop("base_model", index.get("base_model"))
        unknown = sorted(set(components) - set(expected))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got {unknown}, which are not components of the pipeline; pass "
                f"components by name ({', '.join(sorted(expected))}) and move or cast the pipeline after loading."
            )
        for name in sorted(set(expected) - set(components)):
            if name not in index:
                raise ValueError(f"{folder / 'model_index.json'} lists no {name!r} component; re-save the pipeline.")
            library_name, class_name = index[name]
            if library_name is None or class_name is None:
                components[name] = None
                continue
            if (folder / name / f"{library_name}.py").is_file():  # code saved beside it: this library's class
                component_class = getattr(library, class_name)
            else:
                component_class = getattr(importlib.import_module(library_name), class_name)
            components[name] = component_class.from_pretrained(folder / name)
        return cls(**components, base_model=base_model)

    def load_edited_lora(self, lora: Any, direction, strength: float, adapter_name: str = EDIT_ADAPTER) -> None:
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
        lora: Any,
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


class W2WEditPipeline(W2WEditMixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Stable Diffusion 1.5 with a weight-space LoRA editor (weights2weights, ImageGem §4.3).

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: The Stable Diffusion 1.5 components.
        weight_space: The `WeightSpace` the LoRA and the directions live in (same base model as the UNet).
        base_model: Path or repo id of the base pipeline the components come from (the card's `base_model`); by
            default the folder the UNet was loaded from.

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
        self, vae, text_encoder, tokenizer, unet, scheduler, weight_space, base_model: str | None = None
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


def strengths_grid(low: float, high: float, count: int) -> list[float]:
    """`count` evenly spaced strengths from `low` to `high` (always including 0 when it lies in the range)."""
    values = np.linspace(low, high, count).tolist()
    if low < 0 < high and not any(abs(v) < 1e-9 for v in values):
        values = sorted([*values, 0.0])
    return [round(float(v), 6) for v in values]
