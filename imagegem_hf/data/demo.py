"""Demo stage `data`: synthesise the sample, build the dataset, rec subsets, preference pairs, statistics."""

from __future__ import annotations

import pandas as pd

from imagegem_hf.data.build import build_dataset
from imagegem_hf.data.pairs import make_preference_pairs, write_preference_pairs
from imagegem_hf.data.stats import dataset_statistics
from imagegem_hf.data.subsets import make_rec_subsets, subset_statistics
from imagegem_hf.data.synth import generate_raw_sample

PAIR_SAMPLE = 2000  # images clustered for the demo's preference pairs (embedding is the slow part on a CPU)


def run_demo(context) -> list[str]:
    """Run the data stage; sets `context.artifacts["dataset_dir"]`."""
    raw_dir = context.output_dir / "raw"
    dataset_dir = context.output_dir / "dataset"
    out = context.stage_dir("data")
    counts = generate_raw_sample(raw_dir, users=context.users, seed=context.seed)
    print(f"Synthetic raw dump: {counts['images']:,} image records, {counts['models']:,} models → {raw_dir}")
    report = build_dataset(raw_dir, dataset_dir, overwrite=True)
    print("\nTable 1 (raw → filtered):\n" + report.table1())
    print(f"Quarantined records: {report.rejected}; dropped by filters: {report.dropped}")

    subsets = make_rec_subsets(pd.read_parquet(dataset_dir / "interactions"))
    table3 = subset_statistics(subsets)
    print("\nTable 3 (recommendation subsets):\n" + table3)
    (out / "table3.md").write_text(table3 + "\n", encoding="utf-8")

    images = pd.read_parquet(dataset_dir / "images").drop_duplicates("imageId")
    pairs = make_preference_pairs(images.sample(min(PAIR_SAMPLE, len(images)), random_state=context.seed))
    write_preference_pairs(pairs, dataset_dir)
    print(f"\nPreference pairs (reaction scores, {PAIR_SAMPLE} sampled images): {len(pairs)}")

    written = dataset_statistics(dataset_dir, out)
    context.artifacts["dataset_dir"] = dataset_dir
    return [
        f"dataset → {dataset_dir} (load_dataset('{dataset_dir}', 'images'|'loras'|'interactions'|'preference_pairs'))",
        f"Table 3 → {out / 'table3.md'}",
    ] + [f"{name} → {path}" for name, path in written.items()]
