"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences, scored as
`logit_scale.exp() · cos(text, image)` (REFERENCE.md §5)."""

from __future__ import annotations

import os

import torch

from imagegem_hf.scoring.base import CLIPProcessorScorer


class PickScore(CLIPProcessorScorer):
    """PickScore of `(image, prompt)` pairs: `model.logit_scale.exp() * cos(image_embeds, text_embeds)`.

    Images go through the `CLIPProcessor` (shortest side resized, center crop), prompts through its tokenizer
    (truncated to 77 tokens), as in the reference implementation.

    Args:
        model: A `transformers.CLIPModel` (`yuvalkirstain/PickScore_v1` for the real score); moved to `device`
            and `dtype`.
        processor: The matching `CLIPProcessor` (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` for PickScore_v1).
        device: Where the model runs.
        dtype: Model dtype; scores are returned as float32.

    Example:
        ```python
        >>> from imagegem_hf.scoring import PickScore
        >>> from imagegem_hf.testing import random_images, tiny_clip_model
        >>> scorer = PickScore(*tiny_clip_model())
        >>> scorer.score(random_images(2), ["a cat", "a dog"]).shape
        torch.Size([2])
        ```
    """

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = "yuvalkirstain/PickScore_v1",
        processor_path_or_repo_id: str | os.PathLike = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> PickScore:
        """Load the PickScore `CLIPModel` and its processor from local directories or Hub repo ids.

        Example:
            ```python
            >>> from imagegem_hf.scoring import PickScore
            >>> scorer = PickScore.from_pretrained(device="cuda", dtype=torch.float16)  # doctest: +SKIP
            ```
        """
        return cls._load(path_or_repo_id, processor_path_or_repo_id, device, dtype)

    def _combine(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.float().exp() * (image_embeds * text_embeds).sum(-1)
