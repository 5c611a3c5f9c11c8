"""`fetch_loras` against a local server: hashes verified, pickles never loaded, resume after a dead server."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
from safetensors.numpy import save

from imagegem_hf.fetch import FetchConfig
from imagegem_hf.fetch.local_server import LocalServer
from imagegem_hf.fetch.loras import fetch_loras, lora_rank, read_manifest

from .conftest import write_config

FAST = FetchConfig(concurrency=4, requests_per_second=None, retries=2, backoff=0.01, max_backoff=2.0, timeout=0.5)


def lora_bytes(rank: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return save(
        {
            f"{prefix}.lora_down.weight": rng.standard_normal((rank, 8)).astype(np.float16),
            f"{prefix}.lora_up.weight": rng.standard_normal((8, rank)).astype(np.float16),
            f"{prefix}.alpha": np.array(rank, dtype=np.float16),
        }
    )


def row(version: int, url: str, data: bytes, **extra) -> dict:
    return {
        "modelId": version // 10,
        "modelName": f"m{version}",
        "modelVersionId": version,
        "fileId": version * 10,
        "fileName": f"m{version}.safetensors",
        "baseModel": "SDXL 1.0",
        "tags": "style, anime",
        "format": "SafeTensor",
        "primary": 1,
        "hashSHA256": hashlib.sha256(data).hexdigest().upper(),
        "downloadUrl": url,
        **extra,
    }


def test_files_are_verified_filtered_and_never_unpickled(tmp_path, server):
    good, big = lora_bytes(4), lora_bytes(32, seed=1)
    pickled = pickle.dumps({"weights": [1, 2, 3]})
    server.files.update({"good": good, "big": big, "pickle": pickled})
    rows = [
        row(10, server.url("/file/good"), good),
        row(11, server.url("/file/good"), good, hashSHA256="00" * 32),  # the hash of another file
        row(12, server.url("/file/pickle"), pickled),  # claims safetensors, is a pickle
        row(13, server.url("/file/pickle"), pickled, format="PickleTensor"),  # never downloaded
        row(14, server.url("/missing/x"), good),
        row(15, server.url("/file/big"), big),  # rank 32 > max_rank
        row(16, server.url("/file/good"), good, baseModel="SD 1.5"),  # other base model
        row(17, server.url("/file/good"), good, primary=0),  # not the main file
    ]
    write_config(tmp_path / "ds", "loras", rows)
    report = fetch_loras(
        tmp_path / "ds", tmp_path / "out", config=FAST, base_models=["sdxl"], max_rank=16, show_progress=False
    )
    assert (report.selected, report.not_safetensors, report.stored, report.filtered) == (5, 1, 1, 1)
    assert dict(report.reasons) == {"sha256 mismatch": 1, "not a safetensors file (SafetensorError)": 1, "http 404": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".lock",
        "10.safetensors",
        "failures.jsonl",
        "manifest.jsonl",
    ]
    assert (tmp_path / "out/10.safetensors").read_bytes() == good
    assert read_manifest(tmp_path / "out") == [
        {
            "baseModel": "SDXL 1.0",
            "bytes": len(good),
            "file": "10.safetensors",
            "modelId": 1,
            "modelName": "m10",
            "modelVersionId": 10,
            "rank": 4,
            "sha256": hashlib.sha256(good).hexdigest(),
            "tags": "style, anime",
        }
    ]
    assert server.hits["/file/pickle"] == 1  # row 13 was not requested
    failures = [json.loads(line) for line in (tmp_path / "out/failures.jsonl").read_text().splitlines()]
    assert [f["modelVersionId"] for f in failures] == [11, 12, 14]


def test_tag_filter_and_rank_from_the_header(tmp_path, server):
    data = lora_bytes(8)
    server.files["a"] = data
    write_config(
        tmp_path / "ds",
        "loras",
        [row(20, server.url("/file/a"), data), row(21, server.url("/file/a"), data, tags="style, photo")],
    )
    report = fetch_loras(tmp_path / "ds", tmp_path / "out", config=FAST, tags=["Anime"], show_progress=False)
    assert report.selected == report.stored == 1
    assert lora_rank(tmp_path / "out/20.safetensors") == 8


def test_a_dead_server_leaves_pending_files_that_a_rerun_fetches_once(tmp_path):
    data = [lora_bytes(2, seed=i) for i in range(12)]
    with LocalServer() as first:
        port = first.port
        first.files.update({f"f{i}": d for i, d in enumerate(data)})
        rows = [row(100 + i, first.url(f"/file/f{i}"), d) for i, d in enumerate(data)]
        write_config(tmp_path / "ds", "loras", rows)
        first.fail_after = 5
        one = fetch_loras(tmp_path / "ds", tmp_path / "out", config=FAST, show_progress=False)
    assert one.failed == 0 and one.pending > 0 and one.stored + one.pending == 12
    assert not list((tmp_path / "out").glob(".*.part"))
    with LocalServer(port=port) as second:
        second.files.update({f"f{i}": d for i, d in enumerate(data)})
        two = fetch_loras(tmp_path / "ds", tmp_path / "out", config=FAST, show_progress=False)
        assert sum(second.hits.values()) == one.pending  # stored files are not downloaded again
    assert (two.stored, two.existing, two.pending, two.failed) == (12, one.stored, 0, 0)
    assert [e["modelVersionId"] for e in read_manifest(tmp_path / "out")] == list(range(100, 112))
