"""Base vs Diffusion-DPO-tuned pipelines on a prompt set: same seeds, three reward scores (ImageGem Table 4).

Each pipeline generates one image per (prompt, seed); every image is scored by each scorer (PickScore, HPSv2,
CLIP score, or any `Scorer`); the table reports the mean score per pipeline and the win rate of each pipeline
against the first one (the base) on the same (prompt, seed). Under `accelerate launch` (or `torchrun`) the batches
of (prompt, seed) jobs are split across processes and gathered back in job order: each image comes from its own
seeded generator and the batches do not depend on the number of processes, so the scores are those of one process.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from imagegem_hf.distributed import map_batches
from imagegem_hf.scoring.base import Scorer


def _job_batches(prompts: Sequence[str], seeds: Sequence[int], batch_size: int) -> list[list[tuple[str, int]]]:
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    return [jobs[start : start + batch_size] for start in range(0, len(jobs), batch_size)]


def _generate(pipeline, batch: list[tuple[str, int]], **call_kwargs) -> list[Image.Image]:
    generators = [torch.Generator(device=pipeline.device).manual_seed(seed) for _, seed in batch]
    return pipeline([prompt for prompt, _ in batch], generator=generators, **call_kwargs).images


def generate_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 4,
    **call_kwargs,
) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major, each from its own `torch.Generator(seed)` so that two pipelines
    given the same prompts and seeds start from the same noise. Under a distributed launch the batches are split
    across processes and every process gets all the images back, in order.

    Example:
        ```python
        >>> images = generate_images(pipe, ["a dog"], seeds=[0, 1, 2], num_inference_steps=30)  # doctest: +SKIP
        ```
    """
    batches = _job_batches(prompts, seeds, batch_size)
    generated = map_batches(functools.partial(_generate, pipeline, **call_kwargs), batches, desc="Generating")
    return [image for images in generated for image in images]


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str], cell: int = 128) -> Image.Image:
    """A grid with one labelled row per pipeline (same prompt and seed in each column)."""
    label_width = 8 * max(len(label) for label in labels) + 8
    grid = Image.new("RGB", (label_width + cell * max(len(r) for r in rows), cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cell, cell)), (label_width + c * cell, r * cell))
    return grid


@dataclass
class DPOEvaluation:
    """Per-image scores of several pipelines on the same (prompt, seed) jobs.

    Attributes:
        scores: One row per (pipeline, prompt, seed) with a column per scorer.
        images: `{pipeline name: images}` in job order.
        subset: Name of the prompt set (e.g. "dogs"), shown in the table.
    """

    scores: pd.DataFrame
    images: dict[str, list[Image.Image]]
    subset: str = ""

    @property
    def summary(self) -> pd.DataFrame:
        """Mean score per pipeline and scorer, plus the win rate against the first pipeline."""
        scorer_names = [c for c in self.scores.columns if c not in ("model", "prompt", "seed")]
        means = self.scores.groupby("model", sort=False)[scorer_names].mean()
        names = list(self.images)
        base = self.scores[self.scores.model == names[0]].reset_index(drop=True)
        for name in scorer_names:
            means[f"{name} win rate"] = [
                float((self.scores[self.scores.model == m].reset_index(drop=True)[name] > base[name]).mean())
                for m in means.index
            ]
        return means

    def table(self) -> str:
        """ImageGem Table 4's layout: model, subset, mean PickScore / HPSv2 / CLIP, and win rates vs the base."""
        summary = self.summary
        header = "| Model | Subset | " + " | ".join(summary.columns) + " |"
        lines = [header, "|---|---|" + "---:|" * len(summary.columns)]
        for model, row in summary.iterrows():
            lines.append(f"| {model} | {self.subset} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, stem: str = "dpo_eval", columns: int = 8) -> dict[str, Path]:
        """Write the table (markdown), the per-image scores (CSV) and a base-vs-tuned image grid (PNG)."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"table": out / f"{stem}.md", "scores": out / f"{stem}_scores.csv", "grid": out / f"{stem}_grid.png"}
        paths["table"].write_text(self.table() + "\n")
        self.scores.to_csv(paths["scores"], index=False)
        rows = [images[:columns] for images in self.images.values()]
        image_grid(rows, list(self.images)).save(paths["grid"])
        return paths


def evaluate_pipelines(
    pipelines: dict[str, object],
    prompts: Sequence[str],
    scorers: dict[str, Scorer],
    seeds: Sequence[int] = (0, 1, 2),
    subset: str = "",
    batch_size: int = 4,
    **call_kwargs,
) -> DPOEvaluation:
    """Generate with each pipeline on the same prompts and seeds, and score every image with every scorer.

    Args:
        pipelines: `{name: pipeline}` in table order, the base first (win rates are against it).
        prompts: Evaluation prompts (ImageGem: 200 out-of-distribution DiffusionDB prompts per topic).
        scorers: `{column name: scorer}`, e.g. `{"PickScore": PickScore.from_pretrained(), ...}`.
        seeds: Seeds per prompt (3 in ImageGem).
        subset: Name of the prompt set, shown in the table.
        batch_size: Images per pipeline call.
        **call_kwargs: Passed to the pipelines (`num_inference_steps`, `guidance_scale`, `height`, `width`, …).

    Returns:
        A [`DPOEvaluation`] (`.table()`, `.summary`, `.save(dir)`).

    Example:
        ```python
        >>> from imagegem_hf.scoring import CLIPScore, HPSv2, PickScore
        >>> report = evaluate_pipelines({"SD1.5": base, "ImageGem DPO": tuned}, prompts,
        ...     {"PickScore": PickScore.from_pretrained(), "HPSv2": HPSv2.from_pretrained(),
        ...      "CLIP": CLIPScore.from_pretrained()}, subset="dogs")  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
        ```
    """
    if not prompts:
        raise ValueError("No evaluation prompts.")
    if not scorers:
        raise ValueError("Pass at least one scorer (e.g. {'PickScore': PickScore.from_pretrained()}).")
    batches = _job_batches(prompts, seeds, batch_size)
    jobs = [job for batch in batches for job in batch]

    def generate_and_score(pipeline, batch: list[tuple[str, int]]) -> tuple[list[Image.Image], dict[str, list]]:
        images = _generate(pipeline, batch, **call_kwargs)
        batch_prompts = [prompt for prompt, _ in batch]
        return images, {name: scorer.score(images, batch_prompts).tolist() for name, scorer in scorers.items()}

    frames, all_images = [], {}
    for name, pipeline in pipelines.items():
        results = map_batches(functools.partial(generate_and_score, pipeline), batches, desc=f"Generating ({name})")
        frame = pd.DataFrame({"model": name, "prompt": [p for p, _ in jobs], "seed": [s for _, s in jobs]})
        for scorer_name in scorers:
            frame[scorer_name] = np.array([v for _, scores in results for v in scores[scorer_name]], np.float32)
        frames.append(frame)
        all_images[name] = [image for images, _ in results for image in images]
    return DPOEvaluation(pd.concat(frames, ignore_index=True), all_images, subset)
