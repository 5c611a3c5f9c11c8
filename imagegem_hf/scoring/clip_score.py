"""CLIP score (Hessel et al. 2021, as in torchmetrics): `max(100 · cos(image, text), 0)` with
`openai/clip-vit-large-patch14` (REFERENCE.md §5)."""

from __future__ import annotations

import os

import torch

from imagegem_hf.scoring.base import CLIPProcessorScorer


class CLIPScore(CLIPProcessorScorer):
    """CLIP score of `(image, prompt)` pairs: `max(100 * cos(image_embeds, text_embeds), 0)`.

    Images go through the `CLIPProcessor` (shortest side resized, center crop); prompts are truncated to 77 tokens.

    Args:
        model: A `transformers.CLIPModel` (`openai/clip-vit-large-patch14` for the usual score); moved to `device`
            and `dtype`.
        processor: Its `CLIPProcessor`.
        device: Where the model runs.
        dtype: Model dtype; scores are returned as float32.

    Example:
        ```python
        >>> from imagegem_hf.scoring import CLIPScore
        >>> from imagegem_hf.testing import random_images, tiny_clip_model
        >>> scores = CLIPScore(*tiny_clip_model()).score(random_images(2), ["a cat", "a dog"])
        >>> bool((scores >= 0).all())
        True
        ```
    """

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = "openai/clip-vit-large-patch14",
        processor_path_or_repo_id: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> CLIPScore:
        """Load a `CLIPModel` and its `CLIPProcessor` (from `path_or_repo_id` unless `processor_path_or_repo_id`
        is given) from local directories or Hub repo ids.

        Example:
            ```python
            >>> from imagegem_hf.scoring import CLIPScore
            >>> scorer = CLIPScore.from_pretrained("openai/clip-vit-large-patch14")  # doctest: +SKIP
            ```
        """
        return cls._load(path_or_repo_id, processor_path_or_repo_id or path_or_repo_id, device, dtype)

    def _combine(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return (100.0 * (image_embeds * text_embeds).sum(-1)).clamp(min=0.0)
