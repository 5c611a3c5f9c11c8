"""`VLMRankerPipeline.from_endpoint` against a local chat-completions server: same prompts, images as data URLs,
bounded concurrency, and faults (500s, malformed bodies, timeouts, a server that dies) that never lose the run."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from imagegem_hf.fetch.local_server import LocalServer, scoring_chat
from imagegem_hf.ranker import RankItem, VLMRankerPipeline
from imagegem_hf.ranker.backends import FailedReply, openai_messages
from imagegem_hf.ranker.items import placeholder_image

FAST = {"timeout": 1.0, "retries": 1}


@pytest.fixture
def server():
    with LocalServer() as srv:
        yield srv


def candidates(n: int = 6) -> list[RankItem]:
    return [RankItem(i, image=placeholder_image(str(i), 16), text=f"prompt {i}") for i in range(n)]


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_endpoint_ranking_follows_the_served_scores_and_sends_the_images(server):
    seen = []
    server.chat = lambda request: (seen.append(request), scoring_chat(request))[1]
    ranker = VLMRankerPipeline.from_endpoint(server.url("/v1"), "toy-vlm", n_trials=4, k_subset=3, **FAST)
    profile = ranker.caption("u1", candidates(2))
    assert profile == "The user likes warm colours and simple shapes."
    items = candidates(6)
    result = ranker.rank(profile, items, seed=0)
    assert result.ranking == [0, 1, 2, 3, 4, 5] and not result.problems
    assert all(s.n_trials >= 1 for s in result.scores)
    request = seen[-1]
    assert request["model"] == "toy-vlm" and request["temperature"] == 0.0
    parts = request["messages"][0]["content"]
    images = [decode_data_url(p["image_url"]["url"]) for p in parts if p["type"] == "image_url"]
    ids = [int(i) for i in re.findall(r"image_id: (\d+)\.", " ".join(p.get("text", "") for p in parts))]
    assert len(images) == len(ids) == 3
    for image, item_id in zip(images, ids, strict=True):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(items[item_id].image.convert("RGB")))
    assert ranker.templates.ranking("image") in parts[0]["text"]  # the same appendix-B prompt as in process


def test_messages_keep_the_in_process_content_order():
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    content = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}, {"type": "image"}]
    parts = openai_messages(content, [red, blue])[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url"]
    assert decode_data_url(parts[3]["image_url"]["url"]).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(ValueError, match="more"):
        openai_messages(content, [red])


def test_a_500_is_retried_and_a_malformed_body_is_regenerated_with_sampling(server):
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return 500, b"overloaded"
        if "seed" not in request:  # greedy trials get a broken body; the sampled retry gets scores
            return 200, b"{not json"
        return scoring_chat(request)

    server.chat = flaky
    ranker = VLMRankerPipeline.from_endpoint(server.url("/v1"), "m", n_trials=2, k_subset=3, max_retries=1, **FAST)
    result = ranker.rank("profile", candidates(6), seed=3)
    assert result.ranking == [0, 1, 2, 3, 4, 5]
    assert all(s.n_trials == 1 for s in result.scores)


def test_timeouts_and_a_dead_server_leave_candidates_unscored_in_input_order(server):
    def slow(request):
        time.sleep(3)  # longer than the 1 s timeout
        return scoring_chat(request)

    server.chat = slow
    ranker = VLMRankerPipeline.from_endpoint(server.url("/v1"), "m", n_trials=2, k_subset=3, **FAST)
    items = candidates(5)
    result = ranker.rank("profile", items[::-1], seed=0)
    assert result.ranking == [4, 3, 2, 1, 0]  # the CF order it was given
    assert all(np.isnan(s.mean) and s.n_trials == 0 for s in result.scores)
    assert any("timeout" in p for p in result.problems)

    server.chat = scoring_chat
    server.fail_after = server.request_count  # the server dies: every connection is dropped
    profiles = ranker.caption_batch([("u2", items[:2])])
    assert isinstance(profiles[0], FailedReply) and "connection error" in profiles[0].reason
    result = ranker.rank_batch([(profiles[0], items)], seed=0)[0]
    assert result.ranking == [0, 1, 2, 3, 4] and "no preference profile" in result.problems[0]
    server.fail_after = None  # back up: the failed profile was not cached, so it is written now
    assert ranker.caption("u2", items[:2]) == "The user likes warm colours and simple shapes."


def test_requests_in_flight_are_bounded_by_concurrency(server):
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def counting(request):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return scoring_chat(request)

    server.chat = counting
    ranker = VLMRankerPipeline.from_endpoint(server.url("/v1"), "m", n_trials=12, k_subset=2, concurrency=3, **FAST)
    ranker.rank("profile", candidates(6), seed=0)
    assert 2 <= state["max"] <= 3


def test_an_endpoint_ranker_saves_and_loads_its_endpoint(tmp_path, server):
    server.chat = scoring_chat
    ranker = VLMRankerPipeline.from_endpoint(server.url("/v1"), "toy-vlm", n_trials=3, **FAST)
    ranker.save_pretrained(tmp_path / "ranker")
    assert not list((tmp_path / "ranker").glob("*.safetensors"))
    loaded = VLMRankerPipeline.from_pretrained(tmp_path / "ranker")
    assert (loaded.backend.base_url, loaded.backend.model, loaded.config.n_trials) == (server.url("/v1"), "toy-vlm", 3)
    assert loaded.rank("p", candidates(4), seed=0).ranking == [0, 1, 2, 3]


def test_recommend_cli_reranks_through_an_endpoint(tmp_path, server, capsys):
    from imagegem_hf.cli import main

    server.chat = scoring_chat
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    assert main(["dataset", "synth", str(raw), "--users", "40", "--seed", "2"]) == 0
    assert main(["dataset", "build", str(raw), str(ds)]) == 0
    capsys.readouterr()
    args = ["recommend", str(ds), "--item-type", "model", "--models", "pop,itemknn", "--k", "1,5"]
    args += ["--output-dir", str(tmp_path / "out"), "--rerank", "vlm", "--rerank-model", "itemknn"]
    args += ["--trials", "4", "--subset-size", "3", "--rerank-users", "3"]  # k·T ≥ M: every candidate scored
    assert main([*args, "--vlm-endpoint", server.url("/v1"), "--vlm-model", "stand-in"]) == 0
    assert "| VLM |" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "rerank_model.json").read_text())
    assert report["stability"]["unscored_fraction"] == 0.0
    assert main([*args, "--vlm-endpoint", server.url("/v1")]) == 2  # no --vlm-model
