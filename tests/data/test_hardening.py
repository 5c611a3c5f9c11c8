"""Bad raw input: each case is quarantined with its reason or stops the build naming the file, never a traceback."""

import copy
import gzip
import json
import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imagegem_hf.data.build import RawInputError, build_dataset
from imagegem_hf.data.stats import dataset_statistics

from .conftest import IMAGE_ITEM, MODEL_ITEM, write_page


def _image(**changes):
    item = copy.deepcopy(IMAGE_ITEM)
    item.update(id=9000, modelVersionIds=[70])
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            item[outer][inner] = value
        else:
            item[key] = value
    return item


def _rejected(folder):
    return [json.loads(line) for line in (folder / "rejected.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"id": 2**63}, "imageId"),
        ({"id": 2**70}, "imageId"),
        ({"id": 1e300}, "imageId"),
        ({"id": "inf"}, "'id'"),
        ({"id": "1e400"}, "'id'"),
        ({"stats.likeCount": "inf"}, "'stats.likeCount'"),
        ({"stats.likeCount": "1e400"}, "'stats.likeCount'"),
        ({"stats.likeCount": 2**40}, "likeCount"),
        ({"nsfwLevel": 2**40}, "browsingLevel"),
        ({"width": 2**70}, "width"),
        ({"meta.seed": 2**64}, "seed"),
        ({"meta.seed": -1}, "seed"),
        ({"meta.cfgScale": 1e300}, "cfgScale"),
        ({"modelVersionIds": [{"id": 5}]}, "modelVersionIds[]"),
        ({"modelVersionIds": [[1]]}, "modelVersionIds[]"),
    ],
)
def test_out_of_range_and_unhashable_image_fields_are_quarantined(raw_dir, tmp_path, changes, field):
    write_page(raw_dir / "images" / "bad.json", [_image(**changes)])
    report = build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert report.rejected == {"image": 1} and report.raw["images"] == 12
    (record,) = _rejected(tmp_path / "ds")
    assert record["file"] == "images/bad.json" and record["line"] == 1
    assert field in record["reason"], record["reason"]


def test_overflowing_model_id_is_quarantined(raw_dir, tmp_path):
    write_page(raw_dir / "models" / "bad.json", [dict(copy.deepcopy(MODEL_ITEM), id=2**70)])
    report = build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert report.rejected == {"model": 1}
    (record,) = _rejected(tmp_path / "ds")
    assert "modelId" in record["reason"] and record["file"] == "models/bad.json"


def test_largest_comfyui_seed_is_stored_losslessly(raw_dir, tmp_path):
    write_page(raw_dir / "images" / "seed.json", [_image(**{"meta.seed": 2**64 - 1})])
    build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    table = pq.read_table(tmp_path / "ds" / "images", columns=["imageId", "seed"]).to_pylist()
    assert {row["imageId"]: row["seed"] for row in table}[9000] == 18446744073709551615


def test_corrupt_gzip_names_the_file(raw_dir, tmp_path):
    page = tmp_path / "page.jsonl.gz"
    with gzip.open(page, "wb") as handle:
        handle.write(json.dumps({"items": [_image()] * 200}).encode() + b"\n")
    data = bytearray(page.read_bytes())
    data[40:60] = b"\x00" * 20  # corrupt the deflate stream, keep the gzip header
    (raw_dir / "images" / "corrupt.jsonl.gz").write_bytes(bytes(data))
    with pytest.raises(RawInputError, match=r"corrupt\.jsonl\.gz.*cannot be read"):
        build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("models", ["missing", "empty", "checkpoints", "nulls"])
def test_statistics_without_loras(raw_dir, tmp_path, models):
    if models == "missing":
        for path in (raw_dir / "models").iterdir():
            path.unlink()
        (raw_dir / "models").rmdir()
    elif models == "empty":  # a models/ folder without pages (an empty page stops the build)
        (raw_dir / "models" / "m0.json").unlink()
    elif models == "checkpoints":
        write_page(raw_dir / "models" / "m0.json", [dict(copy.deepcopy(MODEL_ITEM), type="Checkpoint")])
    else:  # nulls everywhere: the model is quarantined, the images have nothing but the required fields
        write_page(raw_dir / "models" / "m0.json", [dict.fromkeys(MODEL_ITEM)])
        for page in (raw_dir / "images").iterdir():
            page.unlink()
        bare = dict.fromkeys(IMAGE_ITEM) | {"id": 1, "createdAt": "2024-01-01", "username": "u"}
        write_page(raw_dir / "images" / "p.json", [bare])
    build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    written = dataset_statistics(tmp_path / "ds", tmp_path / "stats")
    text = written["statistics"].read_text()
    assert f"| loras | {1 if models == 'checkpoints' else 0} | 0 |" in text
    assert (tmp_path / "stats" / "base_models.png").is_file()


def test_json_errors_name_line_and_column(raw_dir, tmp_path):
    (raw_dir / "images" / "bad.json").write_text('{"items": [\n  {"id": 1},\n  {"id": }\n]}')
    with pytest.raises(RawInputError, match=r"bad\.json: line 3, column 10: invalid JSON"):
        build_dataset(raw_dir, tmp_path / "ds", show_progress=False)


@pytest.mark.parametrize(
    "name, content", [("e.jsonl", b""), ("e.jsonl", b"\n \n"), ("e.json", b""), ("e.json", b'{"items": []}')]
)
def test_files_without_records_stop_the_build(raw_dir, tmp_path, name, content):
    (raw_dir / "models" / name).write_bytes(content)
    with pytest.raises(RawInputError, match=rf"models/{name}: no records"):
        build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert not (tmp_path / "ds").exists()


def test_unreachable_entries_are_skipped_with_a_warning_of_counts(raw_dir, tmp_path, caplog):
    images = raw_dir / "images"
    (images / "loop").symlink_to(images, target_is_directory=True)
    (images / "self.json").symlink_to(images / "self.json")
    (images / "dangling.json").symlink_to(tmp_path / "missing.json")
    os.mkfifo(images / "fifo.jsonl")
    with caplog.at_level(logging.WARNING, logger="imagegem_hf.data.build"):
        report = build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert report.raw["images"] == 12
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "1 dangling link" in message and "1 FIFO or other non-regular file" in message
    assert "2 symbolic-link loops" in message


def test_unreadable_folder_is_warned(raw_dir, tmp_path, caplog, monkeypatch):
    locked = raw_dir / "images" / "locked"
    write_page(locked / "p.json", [_image()])
    scandir = os.scandir

    def refusing_scandir(path="."):  # what listing a mode-000 folder does (root reads it, so it is simulated)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with caplog.at_level(logging.WARNING, logger="imagegem_hf.data.build"):
        report = build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert report.raw["images"] == 12  # the locked page is not read
    assert any("1 unreadable folder" in r.getMessage() for r in caplog.records)


def test_versions_and_files_of_another_model_are_quarantined(raw_dir, tmp_path):
    steal_version = dict(copy.deepcopy(MODEL_ITEM), id=4)  # version 70 already belongs to model 3
    steal_file = copy.deepcopy(MODEL_ITEM) | {"id": 5}
    steal_file["modelVersions"][0]["id"] = 80  # a new version, but file 700 is model 3's
    write_page(raw_dir / "models" / "m1.json", [steal_version, steal_file])
    report = build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert report.rejected == {"model": 2}
    reasons = sorted(r["reason"] for r in _rejected(tmp_path / "ds"))
    assert reasons[0].startswith("duplicate fileId 700: it belongs to modelId 3")
    assert reasons[1].startswith("duplicate modelVersionId 70: it belongs to modelId 3")
    loras = pq.read_table(tmp_path / "ds" / "loras").to_pylist()
    assert [(r["modelId"], r["modelVersionId"], r["fileId"]) for r in loras] == [(3, 70, 700)]


@pytest.mark.parametrize("newer_first", [True, False])
def test_surviving_duplicate_is_chosen_by_the_record_not_the_file_name(raw_dir, tmp_path, newer_first):
    newer = _image(createdAt="2024-05-01T00:00:00Z", **{"meta.prompt": "newer"})
    older = _image(createdAt="2024-04-01T00:00:00Z", **{"meta.prompt": "older"})
    tie = _image(createdAt="2024-04-01T00:00:00Z", **{"meta.prompt": "older, same time"})
    first, second = (newer, older) if newer_first else (older, newer)
    write_page(raw_dir / "images" / "a.json", [first, tie])
    write_page(raw_dir / "images" / "b.json", [second])
    model_old = copy.deepcopy(MODEL_ITEM)
    model_new = copy.deepcopy(MODEL_ITEM)
    model_new["name"], model_new["modelVersions"][0]["publishedAt"] = "newer model", "2025-01-01T00:00:00Z"
    write_page(raw_dir / "models" / "m0.json", [model_old if newer_first else model_new])
    write_page(raw_dir / "models" / "m1.json", [model_new if newer_first else model_old])
    report = build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    assert report.rejected == {"image": 2, "model": 1}
    images = pq.read_table(tmp_path / "ds" / "images").to_pylist()
    assert [r["prompt"] for r in images if r["imageId"] == 9000] == ["newer"]
    assert pq.read_table(tmp_path / "ds" / "loras").column("modelName").to_pylist() == ["newer model"]


def test_large_pages_are_streamed_with_the_same_rows(raw_dir, tmp_path, monkeypatch):
    import imagegem_hf.data.build as build

    beyond_64_bits = _image(id=9100, **{"meta.seed": 2**70})  # ijson's C backend stops at it
    write_page(raw_dir / "images" / "big.json", [_image(id=9000 + k) for k in range(50)] + [beyond_64_bits])
    whole = build_dataset(raw_dir, tmp_path / "whole", show_progress=False)
    monkeypatch.setattr(build, "STREAM_BYTES", 64)  # every page and JSONL line is now parsed item by item
    streamed = build_dataset(raw_dir, tmp_path / "streamed", show_progress=False)
    assert whole.rejected == streamed.rejected == {"image": 1} and whole.raw == streamed.raw
    for config in ("images", "loras", "interactions"):
        whole = pq.read_table(tmp_path / "whole" / config)
        assert whole.num_rows > 0 and whole.equals(pq.read_table(tmp_path / "streamed" / config))
