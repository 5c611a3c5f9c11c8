"""Bad raw input: each case is quarantined with its reason or stops the build naming the file, never a traceback."""

import copy
import gzip
import json

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
    else:
        nulls = {key: None for key in MODEL_ITEM} | {"id": 3, "type": "LORA", "creator": {"username": "bob"}}
        nulls["modelVersions"] = [{"id": 70, "files": None}]
        write_page(raw_dir / "models" / "m0.json", [nulls])
        for page in (raw_dir / "images").iterdir():
            page.unlink()
        bare = {"id": 1, "createdAt": "2024-01-01", "username": "u", "meta": None}
        write_page(raw_dir / "images" / "p.json", [bare])
    build_dataset(raw_dir, tmp_path / "ds", show_progress=False)
    written = dataset_statistics(tmp_path / "ds", tmp_path / "stats")
    text = written["statistics"].read_text()
    expected_loras = 1 if models == "nulls" else 0
    assert f"| loras | {1 if models in ('checkpoints', 'nulls') else 0} | {expected_loras} |" in text
    assert (tmp_path / "stats" / "base_models.png").is_file()
