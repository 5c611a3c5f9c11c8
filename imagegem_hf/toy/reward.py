"""The toy world's reward: viewers prefer a bold subject, one that fills more of the frame.

A programmatic stand-in for an aesthetic reward model (HPSv2, PickScore). Size is never named in prompts, so the
base model draws every size from its training range (`SIZE_RANGE`): it is imperfect on this reward everywhere, and a
preference-tuned model can improve on it for every prompt without giving up prompt following, which
`attribute_accuracy` checks separately.

The subject's area is its alpha-matte coverage (`measure_attributes(...)["coverage"]`), not the count of pixels
past a colour threshold (`"size"`): blur and noise grow the thresholded count (a Gaussian blur of σ = 1 pixel adds
up to 20% to it, noise of σ = 0.15 quadruples it), so any fine-tuning that degrades the images would win on it,
whatever it learnt; coverage moves only when the drawn subject does.
"""

from __future__ import annotations

import torch
from PIL import Image

from imagegem_hf.scoring.base import check_pairs
from imagegem_hf.toy.world import measure_attributes


class ToyReward:
    """Scores each image by the percentage of the image the subject covers (`measure_attributes(...)["coverage"]`).

    Implements the `imagegem_hf.scoring.Scorer` protocol; the prompt is accepted and ignored, like an aesthetic
    score. Rendered images of the world score between about 8 (radius 5) and 31 (radius 10).

    Example:
        ```python
        >>> from imagegem_hf.toy import ToyReward, ToySpec, render
        >>> small, large = render(ToySpec("red", "circle", "dark", 5.0)), render(ToySpec("red", "circle", "dark", 9.0))
        >>> ToyReward().score([small, large], ["a red circle", "a red circle"]).round().tolist()
        [8.0, 26.0]
        ```
    """

    name = "toy_size"

    def score(
        self, images: list[Image.Image], prompts: list[str], batch_size: int = 16, show_progress: bool = False
    ) -> torch.Tensor:
        """One score per `(images[i], prompts[i])`: 100 × the fraction of the image covered by the subject (its
        alpha-matte area).

        Args:
            images: PIL images (any mode; measured at their own size).
            prompts: One prompt per image (not used by this reward).
            batch_size: Accepted for the protocol (measuring needs no batching).
            show_progress: Accepted for the protocol.

        Returns:
            A 1-D float32 CPU tensor.
        """
        check_pairs(images, prompts, batch_size)
        return torch.from_numpy(100.0 * measure_attributes(list(images))["coverage"]).float()
