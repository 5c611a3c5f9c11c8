"""Dataset statistics and figures in the shape of the ImageGem paper (Table 1, §3 figures)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from imagegem_hf.data.build import TABLE1_KEYS  # noqa: E402
from imagegem_hf.hub import read_json  # noqa: E402

REACTIONS = ("likeCount", "heartCount", "laughCount", "cryCount", "commentCount", "dislikeCount")


def _read(dataset_dir: Path, config: str, columns: list[str]) -> pd.DataFrame:
    return pq.read_table(dataset_dir / config, columns=columns).to_pandas()


def dataset_statistics(dataset_dir: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the statistics tables (Markdown) and figures (PNG) of a built dataset.

    Args:
        dataset_dir: A folder written by `build_dataset`.
        output_dir: Where to write `statistics.md` and the figures.

    Returns:
        `{name: path}` of everything written.

    Example:
        ```python
        >>> from imagegem_hf.data.stats import dataset_statistics
        >>> paths = dataset_statistics("demo_output/dataset", "demo_output/data")  # doctest: +SKIP
        ```
    """
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    build = read_json(dataset_dir / "build_stats.json")
    images = _read(dataset_dir, "images", ["imageId", "modelVersionId", "prompt", "userHash", *REACTIONS])
    loras = _read(dataset_dir, "loras", ["modelVersionId", "baseModel", "userHash"])
    unique_images = images.drop_duplicates("imageId")
    written: dict[str, Path] = {}

    # Prompt lengths: CDF of word counts, with the > 200 words tail on a log axis.
    words = unique_images["prompt"].fillna("").str.split().str.len().to_numpy()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sorted_words = np.sort(words)
    ax.plot(np.maximum(sorted_words, 1), np.arange(1, len(words) + 1) / max(len(words), 1))
    ax.set_xscale("log")
    ax.axvline(200, color="grey", ls="--", lw=1)
    ax.set(xlabel="words per prompt (log)", ylabel="CDF", title=f"Prompt length ({(words > 200).mean():.2%} > 200)")
    written["prompt_length_cdf"] = _save(fig, output_dir / "prompt_length_cdf.png")

    # Reactions: heavy-tailed counts per emoji, log-log histogram.
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for reaction in REACTIONS:
        counts = unique_images[reaction].to_numpy()
        values, freq = np.unique(counts[counts > 0], return_counts=True)
        if len(values):
            ax.loglog(values, freq, marker=".", ls="", label=reaction.removesuffix("Count"))
    ax.set(xlabel="reactions on an image", ylabel="images", title="Reaction distributions")
    ax.legend(fontsize=7)
    written["reactions"] = _save(fig, output_dir / "reactions.png")

    # Top-30 users by images uploaded and by LoRAs published.
    top_images = unique_images["userHash"].value_counts().head(30)
    top_models = loras.drop_duplicates("modelVersionId")["userHash"].value_counts().head(30)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, top, what in zip(axes, (top_images, top_models), ("images", "LoRAs"), strict=True):
        ax.bar(range(len(top)), top.to_numpy())
        ax.set(xlabel="user rank", ylabel=what, title=f"Top-30 users by {what}")
    written["top_users"] = _save(fig, output_dir / "top_users.png")

    # Base-model shares of LoRA versions.
    shares = loras.drop_duplicates("modelVersionId")["baseModel"].fillna("unknown").value_counts(normalize=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.barh(shares.index[::-1], shares.to_numpy()[::-1])
    ax.set(xlabel="share of LoRA versions", title="Base models")
    written["base_models"] = _save(fig, output_dir / "base_models.png")

    lines = [
        "## Table 1: raw → filtered",
        "",
        table1_markdown(build),
        "",
        "## Base-model shares",
        "",
        "| base model | share |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {share:.1%} |" for name, share in shares.items()]
    lines += ["", "## Reactions per image", "", "| reaction | mean | median | max |", "|---|---:|---:|---:|"]
    for reaction in REACTIONS:
        col = unique_images[reaction]
        lines.append(f"| {reaction} | {col.mean():.2f} | {col.median():.0f} | {col.max()} |")
    lines += ["", f"Prompts over 200 words: {(words > 200).mean():.2%}; median words {np.median(words):.0f}."]
    written["statistics"] = output_dir / "statistics.md"
    written["statistics"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


def table1_markdown(build_stats: dict) -> str:
    """ImageGem Table 1 (raw → filtered counts) from a build's `build_stats.json` content."""
    lines = ["| | raw | filtered |", "|---|---:|---:|"]
    for key in TABLE1_KEYS:
        raw, filtered = build_stats["raw"].get(key, 0), build_stats["filtered"].get(key, 0)
        lines.append(f"| {key.replace('_', ' ')} | {raw:,} | {filtered:,} |")
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
