import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from datasets import load_dataset

from imagegem_hf.data.build import RawInputError, build_dataset
from imagegem_hf.data.schema import CONFIG_NAMES, features_for

from .conftest import IMAGE_ITEM, write_page


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_build_writes_hub_layout_and_loads_all_configs(raw_dir, tmp_path):
    out = tmp_path / "ds"
    report = build_dataset(raw_dir, out, show_progress=False)
    assert report.raw["images"] == 12 and report.filtered["users"] == 4 and report.raw["loras"] == 1
    for config in ("images", "loras", "interactions"):
        ds = load_dataset(str(out), config, split="train", cache_dir=str(tmp_path / "cache"))
        assert ds.features == features_for(config)
    interactions = pd.read_parquet(out / "interactions")
    assert sorted(interactions.itemType.value_counts().items()) == [("image", 12), ("model", 12)]
    assert set(interactions[interactions.itemType == "model"].source) == {"generated"}
    # The card's YAML lists the configs with rows (preference_pairs once filled) with their data files.
    front = (out / "README.md").read_text().split("---")[1]
    configs = yaml.safe_load(front)["configs"]
    assert [c["config_name"] for c in configs] == [c for c in CONFIG_NAMES if c != "preference_pairs"]
    assert configs[0]["data_files"] == [{"split": "train", "path": "images/train-*.parquet"}]


def test_build_is_byte_identical_on_rerun(raw_dir, tmp_path):
    build_dataset(raw_dir, tmp_path / "a", show_progress=False)
    build_dataset(raw_dir, tmp_path / "b", show_progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_bad_records_are_quarantined_with_reasons(raw_dir, tmp_path):
    bad = [dict(IMAGE_ITEM, id=None), dict(IMAGE_ITEM, id=100), dict(IMAGE_ITEM, id=900, width="wide")]
    write_page(raw_dir / "images" / "p2.json", bad)
    (raw_dir / "images" / "p3.jsonl").write_text('{"items": [{"id": 1,\n')
    report = build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "ds" / "rejected.jsonl").read_text().splitlines()]
    assert report.rejected == {"image": 4}
    assert any("missing required field 'id'" in r for r in reasons)
    assert any("duplicate imageId 100" in r for r in reasons)
    assert any("'width' must be an integer" in r for r in reasons)
    assert any("malformed JSON line" in r for r in reasons)
    assert report.raw["images"] == 12


@pytest.mark.parametrize(
    "content, column, message",
    [(b'{"items": [}', 12, "invalid JSON"), (b'{"items": [{"id": "\xff"}]}', 20, "not UTF-8")],
)
def test_unreadable_files_fail_naming_the_file_and_leave_no_output(raw_dir, tmp_path, content, column, message):
    (raw_dir / "images" / "zz.json").write_bytes(content)
    with pytest.raises(RawInputError, match=rf"zz.json: line 1, column {column}: .*{message}"):
        build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_empty_input_fails(tmp_path):
    (tmp_path / "raw" / "images").mkdir(parents=True)
    with pytest.raises(RawInputError, match="No raw image pages"):
        build_dataset(tmp_path / "raw", tmp_path / "ds", show_progress=False)
    write_page(tmp_path / "raw" / "images" / "p.json", [{"id": 1}])
    with pytest.raises(RawInputError, match="No valid image records"):
        build_dataset(tmp_path / "raw", tmp_path / "ds", show_progress=False)
    assert not (tmp_path / "ds").exists()


def test_safety_filters(raw_dir, tmp_path):
    class KeywordScorer:  # a real (keyword) toxicity scorer following the protocol
        def scores(self, texts):
            return {"toxicity": np.array([0.9 if "prompt 1" in t else 0.1 for t in texts])}

    report = build_dataset(raw_dir, tmp_path / "ds", toxicity_scorer=KeywordScorer(), show_progress=False)
    assert report.dropped["toxic_prompt"] == 3 and report.filtered["images"] == 9 and report.raw["images"] == 12
    report = build_dataset(raw_dir, tmp_path / "ds2", max_browsing_level=1, show_progress=False)
    assert report.dropped["browsing_level"] == 12


def test_existing_output_is_not_overwritten_by_default(raw_dir, tmp_path):
    build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    with pytest.raises(FileExistsError):
        build_dataset(raw_dir, tmp_path / "ds", show_progress=False)


def test_seen_ids_matches_a_python_set():
    from imagegem_hf.data.build import _SeenIds

    rng = np.random.default_rng(0)
    seen, reference = _SeenIds(), set()
    for _ in range(20):
        chunk = rng.integers(-50, 200, 37)
        expected = []
        for value in chunk.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert seen.new_mask(chunk).tolist() == expected
    assert len(seen) == len(reference)
