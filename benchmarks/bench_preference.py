"""Preference prototypes: training-step throughput, and data memory against dataset size.

1. Throughput: our batched sequence builder (one processor call for a whole batch, each example's shared references
   encoded once and its liked and disliked targets run on top of them, one forward/backward) vs a naive loop that
   calls the processor and runs the model once per sequence, same tiny LLaVA, same examples, same loss. Target ≥ 2×
   examples/s. Batched full sequences (no prefix sharing) are reported too.
2. Memory: peak RSS of building the per-user dataset from a Pick-a-Pic-style records file (image bytes inline,
   `build_preference_dataset`) and then iterating every example of every split with all its images decoded (what
   the collator loads), for 10K vs 100K synthetic pairs, each size in a fresh process. Target: 100K / 10K ≤ 1.5.
   The control loads the same images table eagerly into `{key: PIL image}` (what loading did before), which grows
   with the data. The records files are written by a separate process first (not measured).

On a CUDA machine it also reports steps/s and peak memory of a training step with a real-size random-weight
LLaVA-1.5-7B-shaped backbone (bf16, LoRA on the language model, N_ref = 8 at 336² images).

Run: `python benchmarks/bench_preference.py [--batch 8 --n-ref 8 --repeats 5] [--skip-throughput]
[--memory-sizes 10000 100000]`.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imagegem_hf.preference import PreferencePrototypeModel
from imagegem_hf.preference.data import (
    PreferenceCollator,
    build_user_splits,
    group_pickapic_records,
    synthetic_pickapic_records,
)
from imagegem_hf.preference.losses import preference_loss
from imagegem_hf.testing import tiny_vlm


def examples_and_images(n_ref: int, image_size: int, seed: int = 0):
    records, images = synthetic_pickapic_records(n_users=12, pairs_per_user=14, image_size=image_size, seed=seed)
    splits = build_user_splits(
        group_pickapic_records(records), n_ref=n_ref, val_users=1, test_users=1, seen_users=0, seed=seed
    )
    return splits["train"], images


def batched_step(model, collator, examples) -> None:
    batch = collator(examples).to(model.device)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    half = labels.shape[0] // 2
    preference_loss(logits[:half], logits[half:])["loss"].backward()


def naive_step(model, collator, examples) -> None:
    """Per example: one processor call and one forward per target; the loss averaged over examples."""
    builder, load = collator.builder, collator.load_image
    for e in examples:
        logits = []
        for target in (e.liked, e.disliked):
            batch = builder([e.query(load, target, collator.n_ref)]).to(model.device)
            logits.append(model(**batch).logits)
        (preference_loss(logits[0], logits[1])["loss"] / len(examples)).backward()


def timed(step, model, collator, examples) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, collator, examples)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def measure(runs: dict, model, examples, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds of each `name: (step, collator)`, the runs interleaved so that a change in machine
    load during the benchmark affects all of them alike."""
    for step, collator in runs.values():  # warm-up
        timed(step, model, collator, examples)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, (step, collator) in runs.items():
            best[name] = min(best[name], timed(step, model, collator, examples))
    return best


def tiny_comparison(batch: int, n_ref: int, repeats: int) -> None:
    examples, images = examples_and_images(n_ref, image_size=16)
    backbone, processor = tiny_vlm(seed=0)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=10, n_ref=n_ref)
    model.train()
    collator = PreferenceCollator(builder, images.__getitem__, n_ref=n_ref, shuffle_references=False)
    full = PreferenceCollator(builder, images.__getitem__, n_ref=n_ref, shuffle_references=False, share_prefix=False)
    work = examples[:batch]
    runs = {"ours": (batched_step, collator), "full": (batched_step, full), "baseline": (naive_step, collator)}
    seconds = measure(runs, model, work, repeats)
    ours, batched_full, baseline = (batch / seconds[name] for name in ("ours", "full", "baseline"))
    ratio = ours / baseline
    print(
        f"tiny LLaVA, {batch} pairs/step, N_ref={n_ref}: shared-prefix batch {ours:.1f} examples/s, "
        f"full-sequence batch {batched_full:.1f}, per-example loop {baseline:.1f}"
    )
    print(
        f"RESULT preference_train_examples_per_s ours={ours:.2f} baseline={baseline:.2f} ratio={ratio:.2f} "
        f"target=2 {'PASS' if ratio >= 2 else 'FAIL'}"
    )


def real_size_cuda(batch: int, n_ref: int, steps: int) -> None:
    """Steps/s and peak memory with a LLaVA-1.5-7B-shaped random backbone (bf16, LoRA r 8, N_ref pairs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    _, processor = tiny_vlm(seed=0, image_size=336)
    processor.patch_size = 14
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(processor.tokenizer),
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=16384,
            pad_token_id=processor.tokenizer.pad_token_id,
        ),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    with torch.device("cuda"):
        backbone = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=10, n_ref=n_ref)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=r".*language_model.*\.(q|k|v|o)_proj"))
    model.train()
    examples, images = examples_and_images(n_ref, image_size=336)
    work = examples[:batch]
    # The shared-prefix batch needs a KV cache, so with activation checkpointing the trainer scores full sequences.
    for checkpointing in (False, True):
        if checkpointing:
            backbone.gradient_checkpointing_enable()
        collator = PreferenceCollator(builder, images.__getitem__, n_ref=n_ref, share_prefix=not checkpointing)
        torch.cuda.reset_peak_memory_stats()
        seconds = measure({"ours": (batched_step, collator)}, model, work, steps)["ours"]
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"LLaVA-1.5-7B-shaped, bf16, LoRA, {batch} pairs/step, N_ref={n_ref}, 336² images, "
            f"{'activation checkpointing, full sequences' if checkpointing else 'shared prefix'}: "
            f"{1 / seconds:.2f} steps/s, {batch / seconds:.2f} examples/s, peak memory {peak:.1f} GiB"
        )


PAIRS_PER_USER = 50
MEMORY_IMAGE_SIZE = 32


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_records(path: Path, n_pairs: int, seed: int = 0) -> None:
    """A Pick-a-Pic-style records parquet (`user_id, image_0, image_1, label_0, caption, jpg_0, jpg_1`) of `n_pairs`
    pairs, 50 per user, written 1,000 rows at a time; each image a distinct noisy 32² PNG with a planted colour."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imagegem_hf.preference.data import COLORS, planted_image

    rng = np.random.default_rng(seed)
    colors = sorted(COLORS)
    schema = pa.schema(
        [("user_id", pa.string()), ("image_0", pa.string()), ("image_1", pa.string()), ("label_0", pa.float64())]
        + [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary())]
    )

    def png(color: str) -> bytes:
        buffer = io.BytesIO()
        planted_image(color, rng, MEMORY_IMAGE_SIZE).save(buffer, format="PNG")
        return buffer.getvalue()

    with pq.ParquetWriter(path, schema) as writer:
        rows = []
        for i in range(n_pairs):
            user, taste = i // PAIRS_PER_USER, colors[(i // PAIRS_PER_USER) % len(colors)]
            label = float(rng.integers(2))
            liked, other = png(taste), png(colors[(colors.index(taste) + 1 + int(rng.integers(3))) % len(colors)])
            rows.append(
                {
                    "user_id": f"user{user}",
                    "image_0": f"img{i}-0",
                    "image_1": f"img{i}-1",
                    "label_0": label,
                    "caption": f"prompt {i % 97}",
                    "jpg_0": liked if label else other,
                    "jpg_1": other if label else liked,
                }
            )
            if len(rows) == 1000 or i == n_pairs - 1:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []


def memory_worker(records: Path, output_dir: Path, n_ref: int, eager: bool) -> dict[str, float]:
    """Build the dataset and iterate it (or, with `eager`, load its images table as `{key: PIL image}`)."""
    from imagegem_hf.preference.data import build_preference_dataset, load_preference_dataset

    floor = peak_rss_mib()  # after imports: torch, transformers, pyarrow, ...
    start = time.perf_counter()
    result: dict[str, float] = {"floor_mib": floor}
    if not eager:
        build_preference_dataset(
            records, output_dir, ("jpg_0", "jpg_1"), n_ref=n_ref, val_users=2, test_users=4, seen_users=4
        )
        result["build_mib"] = peak_rss_mib()
    splits, images = load_preference_dataset(output_dir)
    if eager:
        table = {key: images[key] for key in images}  # what `load_images_table` returned before
        result["images"] = len(table)
    else:
        examples = decoded = 0
        for split in splits.values():
            for e in split:
                for target in (e.liked, e.disliked):
                    query = e.query(images.__getitem__, target, n_ref)
                    decoded += 1 + 2 * len(query.references)
                examples += 1
        result |= {"examples": examples, "decoded_images": decoded}
    result |= {"peak_mib": peak_rss_mib(), "seconds": time.perf_counter() - start}
    return result


def run_worker(*argv: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--memory-worker", *argv], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"memory worker {argv} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_scaling(sizes: list[int], n_ref: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_preference_") as tmp:
        measured = {}
        for n in sizes:
            records = Path(tmp) / f"records_{n}.parquet"
            subprocess.run([sys.executable, __file__, "--write-records", str(n), str(records)], check=True)
            out = Path(tmp) / f"dataset_{n}"
            ours = run_worker(str(records), str(out), str(n_ref), "lazy")
            control = run_worker(str(records), str(out), str(n_ref), "eager")
            measured[n] = ours, control
            on_disk = sum(f.stat().st_size for f in out.rglob("*.parquet")) / 2**20
            size = records.stat().st_size / 2**20
            print(
                f"{n} pairs ({size:.0f} MiB records, {on_disk:.0f} MiB dataset, N_ref={n_ref}): import floor "
                f"{ours['floor_mib']:.0f} MiB; build peak {ours['build_mib']:.0f} MiB; build + iterate "
                f"{ours['examples']} examples ({ours['decoded_images']} images decoded) peak "
                f"{ours['peak_mib']:.0f} MiB in {ours['seconds']:.0f} s; control (images table loaded eagerly, "
                f"{control['images']} images) peak {control['peak_mib']:.0f} MiB"
            )
        small, large = min(sizes), max(sizes)
        (ours_s, control_s), (ours_l, control_l) = measured[small], measured[large]
        ratio = ours_l["peak_mib"] / ours_s["peak_mib"]
        above = [(m["peak_mib"] - m["floor_mib"]) for m in (ours_s, ours_l)]
        print(
            f"above the import floor: {above[0]:.0f} MiB at {small} pairs, {above[1]:.0f} MiB at {large}; control "
            f"ratio {control_l['peak_mib'] / control_s['peak_mib']:.2f}"
        )
        print(
            f"RESULT preference_data_peak_rss_{large // 1000}k_vs_{small // 1000}k ours={ours_l['peak_mib']:.0f} "
            f"baseline={ours_s['peak_mib']:.0f} ratio={ratio:.2f} target=1.5 {'PASS' if ratio <= 1.5 else 'FAIL'}"
        )


def main() -> None:
    if sys.argv[1:2] == ["--write-records"]:
        write_records(Path(sys.argv[3]), int(sys.argv[2]))
        return
    if sys.argv[1:2] == ["--memory-worker"]:
        records, output_dir, n_ref, mode = sys.argv[2:6]
        print(json.dumps(memory_worker(Path(records), Path(output_dir), int(n_ref), eager=mode == "eager")))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="Pairs (examples) per training step.")
    parser.add_argument("--n-ref", type=int, default=8, help="Reference pairs per example.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats (best is kept).")
    parser.add_argument("--skip-throughput", action="store_true", help="Only the memory benchmark.")
    parser.add_argument(
        "--memory-sizes", type=int, nargs="+", default=[10_000, 100_000], help="Pair counts of the memory benchmark."
    )
    parser.add_argument(
        "--memory-n-ref",
        type=int,
        default=2,
        help="References per example in the memory benchmark (sets the decoding work per example, not the memory).",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if not args.skip_throughput:
        tiny_comparison(args.batch, args.n_ref, args.repeats)
    memory_scaling(args.memory_sizes, args.memory_n_ref)
    if torch.cuda.is_available() and not args.skip_throughput:
        real_size_cuda(batch=1, n_ref=args.n_ref, steps=2)


if __name__ == "__main__":
    main()
