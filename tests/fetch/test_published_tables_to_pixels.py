"""The documented path through the CLI: crawl → build → fetch-images → reward-scored pairs, all on a local server."""

from __future__ import annotations

import numpy as np
import pandas as pd
from datasets import load_dataset

from imagegem_hf.cli import main
from imagegem_hf.data.build import iter_raw_items
from imagegem_hf.data.civitai import RecordError
from imagegem_hf.data.pairs import make_preference_pairs
from imagegem_hf.data.synth import generate_raw_sample
from imagegem_hf.fetch.images import fetched_image_loader
from imagegem_hf.fetch.local_server import LocalServer
from imagegem_hf.scoring import PickScore
from imagegem_hf.testing import tiny_clip_model

FAST = ["--rate", "0", "--retries", "1", "--timeout", "2"]


def test_crawl_build_fetch_and_score_pairs_from_the_fetched_pixels(tmp_path, capsys):
    generate_raw_sample(tmp_path / "source", users=10, seed=1)
    with LocalServer() as server:
        for kind in ("images", "models"):
            items = [i for f in sorted((tmp_path / "source" / kind).rglob("*.*")) for _, i in iter_raw_items(f)]
            items = [i for i in items if not isinstance(i, RecordError)]
            for item in items:
                if kind == "images" and isinstance(item, dict) and isinstance(item.get("id"), int):
                    item["url"] = server.url(f"/img/{item['id']}.png")
            server.api_items[kind] = items
        url = server.url("/api/v1")
        assert main(["dataset", "crawl", str(tmp_path / "raw"), "--base-url", url, "--page-size", "40", *FAST]) == 0
        assert main(["dataset", "build", str(tmp_path / "raw"), str(tmp_path / "ds")]) == 0
        assert main(["dataset", "fetch-images", str(tmp_path / "ds"), str(tmp_path / "px"), *FAST]) == 0
    images = pd.read_parquet(tmp_path / "ds" / "images").drop_duplicates("imageId")
    assert f"{len(images)} stored, 0 failed" in capsys.readouterr().out
    pixels = load_dataset(str(tmp_path / "px"), split="train")
    assert sorted(pixels["imageId"]) == sorted(images["imageId"])
    scorer = PickScore(*tiny_clip_model(seed=3))
    pairs = make_preference_pairs(
        images, score="pickscore", scorer=scorer, locate=fetched_image_loader(tmp_path / "px")
    )
    assert len(pairs) > 0 and pairs.attrs["problems"] == {}
    # The scores of the fetched bytes equal the scorer applied to the images that `load_dataset` decodes.
    rows = {row["imageId"]: row for row in pixels}
    for side in ("chosen", "rejected"):
        ids = pairs[side].tolist()
        direct = scorer.score([rows[i]["image"].convert("RGB") for i in ids], [rows[i]["prompt"] for i in ids])
        np.testing.assert_allclose(pairs[f"{side}_score"].to_numpy(), direct.numpy(), rtol=1e-5)
