"""A local fault-injecting server and small datasets whose URLs point at it."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset

from imagegem_hf.data.schema import features_for
from imagegem_hf.fetch.local_server import LocalServer


@pytest.fixture
def server():
    with LocalServer() as srv:
        yield srv


def write_config(root: Path, config: str, rows: list[dict]) -> None:
    features = features_for(config)
    columns = {name: [row.get(name) for row in rows] for name in features}
    (root / config).mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(root / config / "train-00000-of-00001.parquet"))


def write_images(root: Path, urls: list[str], repeat_first: bool = True) -> list[int]:
    """An `images` config, one row per URL (ids 100, 101, ...); the first image has a second row (another LoRA)."""
    rows = [{"imageId": 100 + i, "modelVersionId": 7, "url": url, "prompt": f"p{i}"} for i, url in enumerate(urls)]
    if repeat_first and rows:
        rows.insert(1, dict(rows[0], modelVersionId=8))
    write_config(root, "images", rows)
    return [100 + i for i in range(len(urls))]
