"""The dataset folder is sharded parquet holding image bytes; loading reads examples and images lazily (memory
independent of the dataset's size, measured in benchmarks/bench_preference.py)."""

import gc
import io
import math
import pickle

import pandas as pd
import pyarrow.parquet as pq
from datasets import load_dataset
from PIL import Image

from imagegem_hf.preference.data import (
    PreferenceCollator,
    build_user_splits,
    group_pickapic_records,
    load_preference_dataset,
    save_preference_dataset,
    synthetic_pickapic_records,
)
from imagegem_hf.preference.sequence import PreferenceSequenceBuilder
from imagegem_hf.testing import tiny_vlm


def live_images() -> int:
    gc.collect()
    return sum(isinstance(o, Image.Image) for o in gc.get_objects())


def test_folder_is_sharded_and_loads_without_decoding(tmp_path):
    records, images = synthetic_pickapic_records(n_users=10, pairs_per_user=13, seed=1)
    splits = build_user_splits(group_pickapic_records(records), n_ref=3, val_users=2, test_users=2, seen_users=2)
    folder = save_preference_dataset(splits, tmp_path / "ds", images, max_pairs_per_shard=20, max_images_per_shard=32)
    for name, examples in splits.items():
        shards = sorted((folder / "pairs").glob(f"{name}-*.parquet"))
        assert len(shards) == math.ceil(len(examples) / 20)
        assert [pq.read_metadata(f).num_rows for f in shards[:-1]] == [20] * (len(shards) - 1)
    shards = sorted((folder / "images").glob("images-*-of-*.parquet"))
    assert len(shards) == math.ceil(len(images) / 32) and all(pq.read_metadata(f).num_rows <= 32 for f in shards)
    assert pq.read_schema(shards[0]).field("image").type == "binary"
    del images
    before = live_images()
    loaded, table = load_preference_dataset(folder)
    assert live_images() == before  # nothing decoded at load
    for name, examples in splits.items():
        assert not isinstance(loaded[name], list) and len(loaded[name]) == len(examples)
        assert list(loaded[name]) == examples and loaded[name][-1] == examples[-1]
        assert loaded[name][1:3] == examples[1:3]
    again = pickle.loads(pickle.dumps(loaded["train"]))  # DataLoader workers get a copy
    assert again[5] == splits["train"][5]
    assert table["u3-p4-b"].size == (16, 16) and "u3-p4-b" in table and "nope" not in table
    assert pickle.loads(pickle.dumps(table))["u3-p4-b"].tobytes() == table["u3-p4-b"].tobytes()
    hub = load_dataset(str(folder), "images", split="train", cache_dir=str(tmp_path / "cache"))
    assert hub.num_rows == len(table)
    pairs = load_dataset(str(folder), "pairs", split="test_seen", cache_dir=str(tmp_path / "cache"))
    assert pairs.num_rows == len(splits["test_seen"])


def test_streaming_build_matches_the_in_memory_build(tmp_path):
    from imagegem_hf.preference.data import build_preference_dataset

    records, images = synthetic_pickapic_records(n_users=9, pairs_per_user=12, seed=5)
    encoded = {}
    for key, image in images.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded[key] = buffer.getvalue()
    frame = pd.DataFrame(records)
    frame["jpg_0"], frame["jpg_1"] = frame["image_0"].map(encoded), frame["image_1"].map(encoded)
    frame.sample(frac=1.0, random_state=0).to_parquet(tmp_path / "records.parquet", row_group_size=25)  # users mixed
    kwargs = dict(n_ref=3, val_users=1, test_users=2, seen_users=2, seed=3)
    summary = build_preference_dataset(
        tmp_path / "records.parquet", tmp_path / "ds", ("jpg_0", "jpg_1"), max_pairs_per_shard=16, **kwargs
    )
    splits, table = load_preference_dataset(summary.path)
    expected = build_user_splits(
        group_pickapic_records(frame.sample(frac=1.0, random_state=0).to_dict("records")), **kwargs
    )
    assert {name: list(split) for name, split in splits.items()} == expected
    assert summary.counts["train"] == {
        "examples": len(expected["train"]),
        "users": len({e.user_id for e in expected["train"]}),
    }
    assert all(table[key].tobytes() == images[key].tobytes() for key in list(table)[:20])
    builder = PreferenceSequenceBuilder(tiny_vlm()[1])
    lazy = PreferenceCollator(builder, table.__getitem__, n_ref=3, shuffle_references=False, share_prefix=False)
    eager = PreferenceCollator(builder, images.__getitem__, n_ref=3, shuffle_references=False, share_prefix=False)
    a, b = lazy(splits["train"][:2]), eager(expected["train"][:2])
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and bool((a["pixel_values"] == b["pixel_values"]).all())
