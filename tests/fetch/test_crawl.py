"""`crawl` against a local Civitai-shaped API: the pages build the same dataset, and a killed crawl resumes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from imagegem_hf.data.build import build_dataset, iter_raw_items
from imagegem_hf.data.civitai import RecordError
from imagegem_hf.data.synth import generate_raw_sample
from imagegem_hf.fetch import FetchConfig
from imagegem_hf.fetch.crawl import crawl
from imagegem_hf.fetch.local_server import LocalServer

FAST = FetchConfig(concurrency=1, requests_per_second=None, retries=1, backoff=0.01, max_backoff=1.0, timeout=1.0)


def _items(raw_dir, kind):
    """The API items of a raw dump, without the malformed lines the synthetic dump contains on purpose."""
    items = (item for f in sorted((raw_dir / kind).rglob("*.*")) for _, item in iter_raw_items(f))
    return [item for item in items if not isinstance(item, RecordError)]


@pytest.fixture
def synthetic_api(tmp_path):
    generate_raw_sample(tmp_path / "source", users=30, seed=0)
    items = {kind: _items(tmp_path / "source", kind) for kind in ("images", "models")}
    with LocalServer() as server:
        server.api_items.update(items)
        yield server, items


def test_crawled_pages_build_the_same_dataset_as_the_source_dump(tmp_path, synthetic_api, monkeypatch):
    server, items = synthetic_api
    monkeypatch.setenv("CIVITAI_API_KEY", "secret")
    report = crawl(tmp_path / "raw", base_url=server.url("/api/v1"), page_size=50, config=FAST, show_progress=False)
    assert report.finished == ["images", "models"] and not report.stopped
    assert all(headers.get("Authorization") == "Bearer secret" for _, _, headers in server.arrivals)
    assert report.items == {kind: len(v) for kind, v in items.items()}
    assert _items(tmp_path / "raw", "images") == items["images"]
    build_dataset(tmp_path / "source", tmp_path / "a", show_progress=False)
    build_dataset(tmp_path / "raw", tmp_path / "b", show_progress=False)
    for config in ("images", "loras", "interactions"):
        a = pq.read_table(next((tmp_path / "a" / config).glob("*.parquet")))
        b = pq.read_table(next((tmp_path / "b" / config).glob("*.parquet")))
        assert a.equals(b), config


def test_a_crawl_stopped_by_a_dead_server_resumes_from_its_cursor(tmp_path, synthetic_api):
    server, items = synthetic_api
    url = server.url("/api/v1")
    first = crawl(tmp_path / "raw", base_url=url, resources=("images",), page_size=20, max_pages=2, config=FAST)
    assert first.pages == {"images": 2} and not first.finished
    server.fail_after = server.request_count + 1  # one more page, then the server is gone
    second = crawl(tmp_path / "raw", base_url=url, resources=("images",), page_size=20, config=FAST)
    assert second.pages == {"images": 1} and second.stopped == {"images": "connection error"}
    server.fail_after = None
    third = crawl(tmp_path / "raw", base_url=url, resources=("images",), page_size=20, config=FAST)
    assert third.finished == ["images"]
    assert _items(tmp_path / "raw", "images") == items["images"]  # nothing lost, nothing twice
    state = json.loads((tmp_path / "raw/crawl_state.json").read_text())
    assert state["resources"]["images"]["items"] == len(items["images"])
    with pytest.raises(ValueError, match="same base URL"):
        crawl(tmp_path / "raw", base_url=url, resources=("images",), page_size=50, config=FAST)
