"""`fetch_images` against a local server with faults: counts add up, resume loses and duplicates nothing."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from PIL import Image

from imagegem_hf.fetch import FetchConfig, fetch_images
from imagegem_hf.fetch.local_server import LocalServer, png_bytes

from .conftest import write_config, write_images

FAST = FetchConfig(concurrency=4, requests_per_second=None, retries=2, backoff=0.01, max_backoff=2.0, timeout=0.5)


def _stored(out):
    rows = []
    for shard in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(shard, columns=["imageId"]).column("imageId").to_pylist()
    return rows


def test_images_load_with_datasets_joined_to_their_metadata(tmp_path, server):
    ids = write_images(tmp_path / "ds", [server.url(f"/img/{i}.png") for i in range(5)])
    report = fetch_images(tmp_path / "ds", tmp_path / "out", config=FAST, shard_size=2, show_progress=False)
    assert (report.shards, report.fetched, report.failed, report.shards_incomplete) == (3, 5, 0, 0)
    images = load_dataset(str(tmp_path / "out"), split="train")
    assert images["imageId"] == ids  # one row per image although the first has two LoRA rows
    assert "modelVersionId" not in images.column_names
    assert images[2]["prompt"] == "p2"
    assert images[2]["image"].tobytes() == Image.open(io.BytesIO(png_bytes(2))).convert("RGB").tobytes()


def test_permanent_failures_are_recorded_with_reasons_and_retried_faults_succeed(tmp_path, server):
    paths = [
        "/img/1.png",
        "/missing/2.png",
        "/ratelimit/3.png",
        "/error/4.png",
        "/html/6",
        "/corrupt/7.jpg",
        "/loop/8",
    ]
    write_images(tmp_path / "ds", [server.url(p) for p in paths], repeat_first=False)
    report = fetch_images(tmp_path / "ds", tmp_path / "out", config=FAST, shard_size=10, show_progress=False)
    assert report.fetched == 3  # the image, and the 429 (Retry-After honoured) and 500 that succeed on retry
    assert dict(report.reasons) == {
        "http 404": 1,
        "content type text/html": 1,
        "not a decodable image (UnidentifiedImageError)": 1,
        "redirect loop": 1,
    }
    assert report.fetched + report.failed == report.requested == 7
    failures = [json.loads(line) for line in (tmp_path / "out/failures/train-00000.jsonl").read_text().splitlines()]
    assert {f["imageId"] for f in failures} == {101, 104, 105, 106}
    assert server.hits["/ratelimit/3.png"] == 2 and server.hits["/error/4.png"] == 2


def test_transient_failures_leave_the_shard_for_the_next_run(tmp_path, server):
    server.slow_seconds = 2.0  # longer than the 0.5 s timeout
    write_images(tmp_path / "ds", [server.url("/img/1.png"), server.url("/slow/2.png"), server.url("/truncated/3")])
    report = fetch_images(tmp_path / "ds", tmp_path / "out", config=FAST, shard_size=10, show_progress=False)
    assert (report.shards_incomplete, report.pending, report.fetched) == (1, 3, 0)
    assert not list((tmp_path / "out/data").glob("*.parquet"))  # nothing half-done is visible
    report = fetch_images(
        tmp_path / "ds", tmp_path / "out", config=FAST, shard_size=10, show_progress=False, give_up_transient=True
    )
    assert dict(report.reasons) == {"timeout": 1, "truncated body": 1} and report.fetched == 1


def test_a_server_that_dies_mid_run_and_restarts_loses_and_duplicates_nothing(tmp_path):
    n = 40
    with LocalServer() as first:
        port = first.port
        ids = write_images(tmp_path / "ds", [first.url(f"/img/{i}.png") for i in range(n)])
        first.fail_after = 13  # then every connection is dropped, as by a dead server
        one = fetch_images(tmp_path / "ds", tmp_path / "out", config=FAST, shard_size=5, show_progress=False)
    assert one.shards_incomplete > 0 and one.failed == 0
    assert one.fetched + one.pending == n
    with LocalServer(port=port):  # the restarted server
        two = fetch_images(tmp_path / "ds", tmp_path / "out", config=FAST, shard_size=5, show_progress=False)
    assert (two.fetched, two.failed, two.shards_incomplete) == (n, 0, 0)
    assert two.shards_skipped == one.shards_written
    stored = _stored(tmp_path / "out")
    assert sorted(stored) == ids and len(set(stored)) == n


def test_resume_with_other_arguments_is_refused(tmp_path, server):
    write_images(tmp_path / "ds", [server.url("/img/1.png")])
    fetch_images(tmp_path / "ds", tmp_path / "out", config=FAST, shard_size=10, show_progress=False)
    with pytest.raises(ValueError, match="other arguments"):
        fetch_images(tmp_path / "ds", tmp_path / "out", config=FAST, shard_size=3, show_progress=False)


def test_resize_pairs_and_limit_filters(tmp_path, server):
    ids = write_images(tmp_path / "ds", [server.url(f"/img/{i}.png") for i in range(6)], repeat_first=False)
    write_config(
        tmp_path / "ds",
        "preference_pairs",
        [{"chosen": ids[1], "rejected": ids[4], "topic": "dogs"}, {"chosen": ids[2], "rejected": ids[3], "topic": ""}],
    )
    report = fetch_images(
        tmp_path / "ds", tmp_path / "dogs", config=FAST, topic="dogs", max_size=4, show_progress=False
    )
    assert report.requested == 2 and sorted(_stored(tmp_path / "dogs")) == [ids[1], ids[4]]
    table = pq.read_table(next((tmp_path / "dogs/data").glob("*.parquet")))
    assert table.column("imageWidth").to_pylist() == [4, 4]
    assert Image.open(io.BytesIO(table.column("image")[0]["bytes"].as_py())).size == (4, 4)
    report = fetch_images(tmp_path / "ds", tmp_path / "pairs", config=FAST, pairs=True, limit=3, show_progress=False)
    assert _stored(tmp_path / "pairs") == [ids[1], ids[2], ids[3]]


def test_fetched_pixels_give_the_image_embeddings_of_retrieval(tmp_path, server):
    from imagegem_hf.embeddings import CLIPEmbedder
    from imagegem_hf.recsys.image_features import clip_image_features
    from imagegem_hf.testing import tiny_clip_model

    ids = write_images(tmp_path / "ds", [server.url(f"/img/{i}.png") for i in range(5)], repeat_first=False)
    fetch_images(tmp_path / "ds", tmp_path / "px", config=FAST, shard_size=2, show_progress=False)
    embedder = CLIPEmbedder(*tiny_clip_model(), batch_size=3)
    features = clip_image_features(
        tmp_path / "ds", ids[::-1], embedder, tmp_path / "cache", pixels_dir=tmp_path / "px"
    )
    direct = embedder.embed_images([Image.open(io.BytesIO(png_bytes(i))).convert("RGB") for i in range(5)])
    np.testing.assert_allclose(features.loc[ids].to_numpy(), direct, rtol=1e-5, atol=1e-6)


def test_requests_to_one_host_are_spaced_by_the_rate_limit(tmp_path, server):
    write_images(tmp_path / "ds", [server.url(f"/img/{i}.png") for i in range(6)], repeat_first=False)
    config = FetchConfig(concurrency=6, requests_per_second=10.0, retries=0, timeout=5.0)
    fetch_images(tmp_path / "ds", tmp_path / "out", config=config, shard_size=6, show_progress=False)
    times = sorted(t for t, _, _ in server.arrivals)
    assert len(times) == 6
    # The limiter sleeps before each request, so requests can only arrive later than 1 / rate apart, never sooner.
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.09
