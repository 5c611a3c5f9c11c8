"""Does a toy pipeline follow its prompts? Generate on the grammar's prompts and measure each named attribute."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from imagegem_hf.toy.world import attribute_accuracy, full_prompts

TOY_INFERENCE_STEPS = 20
TOY_GUIDANCE_SCALE = 4.0


def generate(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = TOY_INFERENCE_STEPS,
    guidance_scale: float = TOY_GUIDANCE_SCALE,
    batch_size: int = 64,
) -> list[Image.Image]:
    """One image per `(prompts[i], seeds[i])`, each from its own `torch.Generator(seed)` (row-aligned lists).

    Example:
        ```python
        >>> from imagegem_hf.toy import generate, load_toy_pipeline
        >>> images = generate(load_toy_pipeline(), ["a red circle"], seeds=[0], num_inference_steps=2)
        >>> images[0].size
        (32, 32)
        ```
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator(device=pipeline.device).manual_seed(int(s)) for s in seeds[chunk]]
        out = pipeline(
            list(prompts[chunk]),
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        images.extend(out.images)
    return images


@dataclass
class PromptFollowing:
    """Attribute accuracy of a pipeline's images against their prompts.

    Attributes:
        accuracy: `attribute_accuracy`'s dict (`colour`, `shape`, `background`, `mean`, `chance`, `n`).
        images: The generated images (prompt-major).
        prompts: Their prompts.
    """

    accuracy: dict[str, float]
    images: list[Image.Image]
    prompts: list[str]

    def summary(self) -> str:
        a = self.accuracy
        return (
            f"attribute accuracy {a['mean']:.3f} (chance {a['chance']:.3f}) over {a['n']} named attributes of "
            f"{len(self.images)} images: colour {a['colour']:.3f}, shape {a['shape']:.3f}, "
            f"background {a['background']:.3f}"
        )


def prompt_following(
    pipeline, prompts: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2, 3), **generate_kwargs
) -> PromptFollowing:
    """Generate every prompt with every seed and measure how often each named attribute is right.

    Args:
        pipeline: A toy `StableDiffusionPipeline`.
        prompts: Default: the 36 prompts that name colour, shape and background.
        seeds: Seeds per prompt.
        **generate_kwargs: Passed to [`generate`].

    Example:
        ```python
        >>> from imagegem_hf.toy import load_toy_pipeline, prompt_following
        >>> print(prompt_following(load_toy_pipeline(), seeds=[0]).summary())  # doctest: +SKIP
        ```
    """
    prompts = list(prompts) if prompts is not None else full_prompts()
    jobs = [(p, s) for p in prompts for s in seeds]
    images = generate(pipeline, [p for p, _ in jobs], [s for _, s in jobs], **generate_kwargs)
    return PromptFollowing(attribute_accuracy(images, [p for p, _ in jobs]), images, [p for p, _ in jobs])
