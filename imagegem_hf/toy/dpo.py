"""Diffusion-DPO in the toy world, end to end with the library's own parts.

The base pipeline samples the training prompts; `ToyReward` scores its images; `make_preference_pairs` clusters
the prompts (HDBSCAN on sentence embeddings) and pairs the best with the worst image of each cluster (min-max,
ImageGem §4.1); `DiffusionDPOTrainer` trains a LoRA on those pairs; `evaluate_pipelines` compares base and tuned
on held-out prompts and seeds. `benchmarks/learn_dpo.py` and the demo's `dpo` stage run these steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from imagegem_hf.toy.evaluation import TOY_GUIDANCE_SCALE, TOY_INFERENCE_STEPS, generate
from imagegem_hf.toy.pipeline import load_toy_pipeline
from imagegem_hf.toy.reward import ToyReward
from imagegem_hf.toy.world import BACKGROUNDS, COLOURS, SHAPES, all_prompts, attribute_accuracy, prompt_for

BASE_NAME = "toy SD"


def dpo_prompt_split() -> tuple[list[str], list[str], list[str]]:
    """`(train_prompts, validation_prompts, heldout_prompts)` of the toy grammar's 84 prompts.

    18 fully specified prompts are held out for the final evaluation: each colour with each shape once, on the dark
    and the light background in turn (9 each). Six more, one per colour, each on the background its colour and
    shape are not held out on, are the validation split on which training settings are chosen. The other 60 prompts
    (12 fully specified, 48 naming fewer attributes) are for mining pairs.

    Example:
        ```python
        >>> train, validation, heldout = dpo_prompt_split()
        >>> len(train), len(validation), len(heldout), set(train) & set(heldout), set(validation) & set(heldout)
        (60, 6, 18, set(), set())
        >>> heldout[:2]
        ['a red circle on a dark background', 'a red square on a light background']
        ```
    """
    colours, shapes, backgrounds = list(COLOURS), list(SHAPES), list(BACKGROUNDS)

    def background(i: int, j: int, other: bool = False) -> str:
        """The background colour i and shape j are held out on, or the other one."""
        return backgrounds[(i + j + other) % len(backgrounds)]

    heldout = [prompt_for(c, s, background(i, j)) for i, c in enumerate(colours) for j, s in enumerate(shapes)]
    validation = [
        prompt_for(c, shapes[i % len(shapes)], background(i, i % len(shapes), other=True))
        for i, c in enumerate(colours)
    ]
    return [p for p in all_prompts() if p not in heldout and p not in validation], validation, heldout


def sample_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    image_dir: str | os.PathLike,
    num_inference_steps: int = TOY_INFERENCE_STEPS,
    guidance_scale: float = TOY_GUIDANCE_SCALE,
) -> pd.DataFrame:
    """Generate every (prompt, seed) and write `<imageId>.png` files: the rows of an `images` table.

    Returns:
        A DataFrame with `imageId`, `prompt` and `seed`, one row per image.
    """
    folder = Path(image_dir)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(p, s) for p in prompts for s in seeds]
    images = generate(
        pipeline,
        [p for p, _ in jobs],
        [s for _, s in jobs],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )
    for image_id, image in enumerate(images):
        image.save(folder / f"{image_id}.png")
    prompts_column, seeds_column = [p for p, _ in jobs], [s for _, s in jobs]
    return pd.DataFrame({"imageId": np.arange(len(jobs)), "prompt": prompts_column, "seed": seeds_column})


def mine_pairs(
    images: pd.DataFrame, image_dir: str | os.PathLike, pairs_per_cluster: int = 4, min_cluster_size: int = 5
) -> pd.DataFrame:
    """Score the images with `ToyReward` and build min-max pairs within HDBSCAN prompt clusters
    (`make_preference_pairs`, the library's ImageGem §4.1 path)."""
    from imagegem_hf.data.pairs import image_dir_loader, make_preference_pairs

    return make_preference_pairs(
        images,
        scorer=ToyReward(),
        locate=image_dir_loader(image_dir),
        min_cluster_size=min_cluster_size,
        pairs_per_cluster=pairs_per_cluster,
    )


def flip_labels(dataset, seed: int = 0):
    """The control: the same exchange-format pairs with each preference reversed by a fair coin of its own.

    The coins come from a stream of their own (`seed` spawns it), never from the one `exchange_format` draws the
    winner's side with: with the same seed both would draw the same bits, so "flipping" would give every pair its
    true label back. About half the preferences are reversed and the labels carry no information.

    Args:
        dataset: Pairs in the exchange format (`label_0` 1.0 or 0.0).
        seed: Seed of the coins.

    Returns:
        The dataset with `label_0` replaced by `1 − label_0` where the coin came up heads.

    Example:
        ```python
        >>> from datasets import Dataset
        >>> pairs = Dataset.from_dict({"label_0": [1.0, 0.0] * 100})
        >>> flipped = flip_labels(pairs)
        >>> 0.4 < sum(a != b for a, b in zip(pairs["label_0"], flipped["label_0"])) / 200 < 0.6
        True
        ```
    """
    coins = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).random(len(dataset)) < 0.5
    return dataset.map(
        lambda row, i: {"label_0": 1.0 - row["label_0"] if coins[i] else row["label_0"]}, with_indices=True
    )


def reward_gain(scores: pd.DataFrame, base: str, tuned: str, column: str = "reward") -> dict[str, float]:
    """Win rate and mean reward gain of `tuned` over `base` on the same (prompt, seed) jobs.

    Args:
        scores: `DPOEvaluation.scores` (columns `model`, `prompt`, `seed`, `column`).
        base: Name of the base pipeline in `scores.model`.
        tuned: Name of the tuned pipeline.
        column: The score column.

    Returns:
        `win_rate` (tuned higher; a tie, e.g. two identical images or two without a subject, counts one half, so
        that a model equal to the base scores 0.5), `ties` (their fraction), `mean_gain`, `seed_std` (standard
        deviation over seeds of the per-seed mean gain), `n` (images per model).
    """
    keys = ["prompt", "seed"]
    a = scores[scores.model == base].set_index(keys)[column]
    b = scores[scores.model == tuned].set_index(keys)[column].reindex(a.index)
    gain = (b - a).rename("gain").reset_index()
    per_seed = gain.groupby("seed")["gain"].mean()
    ties = gain["gain"] == 0
    return {
        "win_rate": float(((gain["gain"] > 0) + 0.5 * ties).mean()),
        "ties": float(ties.mean()),
        "mean_gain": float(gain["gain"].mean()),
        "seed_std": float(per_seed.std(ddof=1)),
        "n": int(len(gain)),
    }


@dataclass
class ToyDPOConfig:
    """Sizes and training settings of a toy Diffusion-DPO run (the benchmark's defaults).

    Example:
        ```python
        >>> from imagegem_hf.toy.dpo import ToyDPOConfig
        >>> ToyDPOConfig(train_seeds=4).pairs_per_cluster
        4
        ```
    """

    train_seeds: int = field(default=8, metadata={"help": "Base samples per training prompt (60 prompts)."})
    eval_seeds: int = field(
        default=12,
        metadata={
            "help": "Seeds per held-out prompt (18 prompts). The 6 validation prompts get three times as many, so "
            "both splits have as many images."
        },
    )
    pairs_per_cluster: int = field(default=4, metadata={"help": "Min-max pairs per prompt cluster."})
    min_cluster_size: int = field(
        default=4,
        metadata={
            "help": "HDBSCAN's smallest prompt cluster (images). At most train_seeds, each prompt's samples form a "
            "cluster of their own, so both images of a pair answer the caption; above it, clusters merge prompts "
            "and the losers are mostly images of other prompts."
        },
    )
    max_steps: int = field(default=300, metadata={"help": "Diffusion-DPO training steps."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per step."})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the LoRA."})
    beta_dpo: float = field(default=5000.0, metadata={"help": "β of the Diffusion-DPO loss."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank on the UNet's attention projections."})
    seed: int = field(default=0, metadata={"help": "Seed of the pair order, label sides and LoRA init."})


def mine_toy_pairs(output_dir: str | os.PathLike, config: ToyDPOConfig, base_path=None):
    """Sample the training prompts with the base model, score and pair the images; returns
    `(pairs, exchange-format dataset)`."""
    from imagegem_hf.data.pairs import exchange_format, image_dir_loader

    train_prompts, _, _ = dpo_prompt_split()
    pixel_dir = Path(output_dir) / "pixels"
    images = sample_images(load_toy_pipeline(base_path), train_prompts, range(config.train_seeds), pixel_dir)
    pairs = mine_pairs(
        images, pixel_dir, pairs_per_cluster=config.pairs_per_cluster, min_cluster_size=config.min_cluster_size
    )
    if pairs.empty:
        raise ValueError(f"No preference pair found among {len(images)} images; raise train_seeds.")
    return pairs, exchange_format(pairs, image_dir_loader(pixel_dir), seed=config.seed)


def train_toy_dpo(dataset, output_dir: str | os.PathLike, config: ToyDPOConfig, base_path=None) -> dict[str, float]:
    """Train a Diffusion-DPO LoRA on the toy base and save it to `output_dir`; returns the last logged metrics."""
    from imagegem_hf.dpo.config import DiffusionDPOConfig
    from imagegem_hf.dpo.trainer import DiffusionDPOTrainer

    args = DiffusionDPOConfig(
        str(Path(output_dir) / "run"),
        resolution=32,
        per_device_train_batch_size=config.batch_size,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        beta_dpo=config.beta_dpo,
        lora_rank=config.lora_rank,
        logging_steps=max(1, config.max_steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=config.seed,
        disable_tqdm=True,
    )
    trainer = DiffusionDPOTrainer(load_toy_pipeline(base_path), args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(output_dir))
    return [entry for entry in trainer.state.log_history if "loss" in entry][-1]


def evaluate_toy_dpo(
    lora_dirs: dict[str, str | os.PathLike], config: ToyDPOConfig, base_path=None, split: str = "held-out"
) -> tuple[object, dict[str, dict[str, float]]]:
    """Base vs each tuned LoRA on the held-out prompts (seeds 1000, 1001, ...) or the validation prompts (seeds
    2000, 2001, ...), scored by `ToyReward`, with the same noise for every prompt of one seed.

    Args:
        lora_dirs: `{name: folder}` of `train_toy_dpo` outputs.
        config: Its `eval_seeds` sets the seeds per held-out prompt; the validation split, with a third as many
            prompts, gets three times as many seeds.
        base_path: The base pipeline folder (default: the shipped toy base).
        split: `"held-out"` (the final evaluation) or `"validation"` (for choosing training settings).

    Returns:
        `(report, stats)`: the `DPOEvaluation` (base first) and, per tuned name, `reward_gain`'s numbers plus the
        attribute accuracy of its images (`accuracy`) beside the base's (`base_accuracy`).
    """
    from imagegem_hf.dpo.evaluate import evaluate_pipelines
    from imagegem_hf.dpo.trainer import load_dpo_weights

    if split not in ("held-out", "validation"):
        raise ValueError(f"split must be 'held-out' or 'validation', got {split!r}.")
    _, validation, heldout = dpo_prompt_split()
    prompt_set, first_seed = (heldout, 1000) if split == "held-out" else (validation, 2000)
    n_seeds = config.eval_seeds * len(heldout) // len(prompt_set)
    pipelines = {BASE_NAME: load_toy_pipeline(base_path)}
    for name, folder in lora_dirs.items():
        pipelines[name] = load_toy_pipeline(base_path)
        load_dpo_weights(pipelines[name], folder)
    report = evaluate_pipelines(
        pipelines,
        prompt_set,
        {"reward": ToyReward()},
        seeds=range(first_seed, first_seed + n_seeds),
        subset=split,
        batch_size=64,
        num_inference_steps=TOY_INFERENCE_STEPS,
        guidance_scale=TOY_GUIDANCE_SCALE,
    )
    prompts = [p for p in prompt_set for _ in range(n_seeds)]
    base_accuracy = attribute_accuracy(report.images[BASE_NAME], prompts)["mean"]
    stats = {}
    for name in lora_dirs:
        stats[name] = reward_gain(report.scores, BASE_NAME, name)
        stats[name]["accuracy"] = attribute_accuracy(report.images[name], prompts)["mean"]
        stats[name]["base_accuracy"] = base_accuracy
    return report, stats
