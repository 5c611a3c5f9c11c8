"""The scorer protocol and what the CLIP-based scorers share: input checks, batching, normalised embeddings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from tqdm.auto import tqdm

from imagegem_hf.embeddings import clip_features


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores `(image, prompt)` pairs.

    `score(images, prompts, batch_size)` returns a 1-D float32 CPU tensor with one score per pair and raises
    `ValueError` when `len(images) != len(prompts)` or the input is empty.
    """

    def score(self, images: list[Image.Image], prompts: list[str], batch_size: int = 16) -> torch.Tensor: ...


def check_pairs(images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int) -> None:
    """Validate the arguments of `Scorer.score` with messages that say what to pass instead.

    Raises:
        ValueError: Lengths differ, the input is empty, `batch_size < 1`, or an element has the wrong type.
    """
    if isinstance(prompts, str):
        raise ValueError("`prompts` must be a list of strings (one per image), not a single string.")
    if len(images) != len(prompts):
        raise ValueError(
            f"Got {len(images)} images but {len(prompts)} prompts; pass exactly one prompt per image "
            "(repeat a prompt to score several images against it)."
        )
    if len(images) == 0:
        raise ValueError("Nothing to score: `images` and `prompts` are empty.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] is a {type(image).__name__}, not a PIL.Image.Image; open it with PIL.")
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] is a {type(prompt).__name__}, not a string.")


class CLIPPairScorer:
    """Shared machinery of the CLIP-based scorers: a `transformers.CLIPModel` on an explicit device and dtype.

    Subclasses implement `_inputs(images, prompts)` (the model inputs of one batch) and `_combine(image_embeds,
    text_embeds)` (one score per row from L2-normalised projected embeddings).

    Args:
        model: A `transformers.CLIPModel`; it is moved to `device` and `dtype` and put in eval mode.
        device: Where the model runs (`"cpu"`, `"cuda"`, `torch.device`).
        dtype: Model and pixel dtype (`torch.float32`, `torch.float16`, `torch.bfloat16`). Scores are always
            returned as float32.
    """

    def __init__(self, model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()

    @property
    def max_length(self) -> int:
        """Longest tokenized prompt the text tower accepts (77 for CLIP)."""
        return int(self.model.config.text_config.max_position_embeddings)

    def _inputs(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(pixel_values, text_inputs)` for one batch, on any device (moved by the caller)."""
        raise NotImplementedError

    def _combine(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """One score per row from row-aligned, L2-normalised float32 embeddings."""
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised projected float32 `(image_embeds, text_embeds)` of one batch, on `self.device`."""
        pixel_values, text_inputs = self._inputs(images, prompts)
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        text_inputs = {key: value.to(self.device) for key, value in text_inputs.items()}
        image_embeds = clip_features(self.model.get_image_features(pixel_values=pixel_values)).float()
        text_embeds = clip_features(self.model.get_text_features(**text_inputs)).float()
        return (
            torch.nn.functional.normalize(image_embeds, dim=-1),
            torch.nn.functional.normalize(text_embeds, dim=-1),
        )

    def score(
        self, images: list[Image.Image], prompts: list[str], batch_size: int = 16, show_progress: bool = False
    ) -> torch.Tensor:
        """Score each `(images[i], prompts[i])` pair.

        Args:
            images: PIL images (any mode and size; converted to RGB).
            prompts: One prompt per image.
            batch_size: Pairs per forward pass.
            show_progress: Show a tqdm bar over batches.

        Returns:
            A 1-D float32 CPU tensor of `len(images)` scores.

        Raises:
            ValueError: Mismatched lengths, empty input, or a non-image / non-string element.
        """
        check_pairs(images, prompts, batch_size)
        images, prompts = list(images), list(prompts)
        chunks = []
        for start in tqdm(
            range(0, len(images), batch_size), disable=not show_progress, desc=f"{type(self).__name__} scoring"
        ):
            image_embeds, text_embeds = self.embed(
                images[start : start + batch_size], prompts[start : start + batch_size]
            )
            with torch.inference_mode():
                chunks.append(self._combine(image_embeds, text_embeds).float().cpu())
        return torch.cat(chunks)


class CLIPProcessorScorer(CLIPPairScorer):
    """A `CLIPPairScorer` whose images and prompts go through a `CLIPProcessor` (shortest side resized, center
    crop; prompts truncated to 77 tokens): the shared part of PickScore and CLIP score.

    Args:
        model: A `transformers.CLIPModel`; moved to `device` and `dtype`.
        processor: Its `CLIPProcessor`.
        device: Where the model runs.
        dtype: Model dtype; scores are returned as float32.
    """

    def __init__(self, model, processor, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(model, device=device, dtype=dtype)
        self.processor = processor

    @classmethod
    def _load(cls, model_path: str | os.PathLike, processor_path: str | os.PathLike, device, dtype):
        """A `CLIPModel` from `model_path` and a `CLIPProcessor` from `processor_path` (local dirs or repo ids)."""
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(model_path, dtype=dtype)
        return cls(model, CLIPProcessor.from_pretrained(processor_path), device=device, dtype=dtype)

    def _inputs(self, images: list[Image.Image], prompts: list[str]):
        return processor_inputs(self.processor, images, prompts, self.max_length)


def tokenize(tokenizer, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of `prompts`, padded to the longest and truncated to `max_length` tokens
    (77 for CLIP; the end-of-text token is kept)."""
    text = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


def processor_inputs(processor, images: list[Image.Image], prompts: list[str], max_length: int):
    """`(pixel_values, text_inputs)` from a `CLIPProcessor`: its image processor (resize the shortest side,
    center crop, normalise) on RGB copies of `images`, and its tokenizer on `prompts` (see `tokenize`)."""
    pixel_values = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    return pixel_values, tokenize(processor.tokenizer, prompts, max_length)
