"""Inference jobs split across processes: embeddings, cached image features and `dpo eval`'s generation + scoring.

`python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed.jobs_worker DATASET OUT` runs
them all; the main process writes the results (and each rank the files it wrote) for the test to compare with one
process.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from imagegem_hf.distributed import end_distributed, is_main_process, process_count_and_index
from imagegem_hf.dpo.evaluate import evaluate_pipelines
from imagegem_hf.embeddings import CLIPEmbedder, SentenceTransformerEmbedder
from imagegem_hf.recsys import image_features
from imagegem_hf.scoring import PickScore
from imagegem_hf.testing import random_images, tiny_clip_model, tiny_sd_pipeline
from tests.distributed.file_audit import record_writes

TEXTS = [f"a photo of thing {i}" + " and more" * (i % 3) for i in range(7)]  # 3 batches of 3, the last short
IMAGE_IDS = np.array([107, 100, 105, 101, 102, 103, 104, 106])


def count_rows(module: torch.nn.Module, counts: dict[str, int], name: str) -> None:
    """Count the batch rows `module` runs on in `counts[name]` (this process's share of the work)."""

    def hook(_module, args, kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        first = first["input_ids"] if isinstance(first, Mapping) else first  # sentence-transformers' features
        counts[name] = counts.get(name, 0) + first.shape[0]

    module.register_forward_pre_hook(hook, with_kwargs=True)


def run(dataset: Path, out: Path) -> dict[str, np.ndarray]:
    """Every job; returns the results by name (also written to `out/results.npz` by the main process), and writes
    the rows this process computed (`out/work_rank{rank}.json`)."""
    rank, counts = process_count_and_index()[1], {}
    clip = CLIPEmbedder(*tiny_clip_model(seed=2), batch_size=3)
    count_rows(clip.model.text_model, counts, "clip text rows")
    count_rows(clip.model.vision_model, counts, "clip image rows")
    sentence = SentenceTransformerEmbedder(batch_size=3)
    count_rows(sentence.model[0], counts, "sentence rows")
    results = {
        "clip_texts": clip.embed_texts(TEXTS),
        "clip_images": clip.embed_images(random_images(7, size=32, seed=4)),
        "sentence_texts": sentence.embed_texts(TEXTS),
    }
    image_features.CACHE_PART_SIZE = 3  # 3 parts, the last short
    with record_writes(out, out / f"writes_rank{rank}.json"):
        features = image_features.clip_image_features(dataset, IMAGE_IDS, clip, out / "cache")
    results["image_features"] = features.to_numpy()
    pipelines = {"base": tiny_sd_pipeline(seed=0), "tuned": tiny_sd_pipeline(seed=1)}
    for pipeline in pipelines.values():
        count_rows(pipeline.vae.decoder, counts, "decoded images")
    report = evaluate_pipelines(
        pipelines,
        ["a dog", "a car", "a red house"],
        {"PickScore": PickScore(*tiny_clip_model(seed=3))},
        seeds=(0, 1),
        batch_size=4,  # 6 jobs: a batch of 4 and a batch of 2
        num_inference_steps=2,
        height=32,
        width=32,
    )
    results["eval_scores"] = report.scores.PickScore.to_numpy()
    results["eval_images"] = np.stack([np.asarray(image) for images in report.images.values() for image in images])
    (out / f"work_rank{rank}.json").write_text(json.dumps(counts))
    if is_main_process():
        np.savez(out / "results.npz", **results)
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    assert process_count_and_index()[0] == 2
    run(Path(sys.argv[1]), Path(sys.argv[2]))
    end_distributed()
