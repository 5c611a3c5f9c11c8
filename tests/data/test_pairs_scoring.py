"""Preference pairs at scale and from reward models: partitioned clustering, scorer scores with missing files,
the exchange format, and the CLI's errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from imagegem_hf.cli import main
from imagegem_hf.data.pairs import (
    cluster_prompts,
    exchange_format,
    image_dir_loader,
    make_preference_pairs,
    scorer_scores,
)
from imagegem_hf.dpo import prepare_dpo_dataset
from imagegem_hf.scoring import PickScore
from imagegem_hf.testing import random_images, tiny_clip_model


def _blobs(n_blobs: int = 40, per_blob: int = 12, dim: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)) * 4
    truth = np.repeat(np.arange(n_blobs), per_blob)
    return (centres[truth] + 0.05 * rng.standard_normal((len(truth), dim))).astype(np.float32), truth


def test_partitioned_clustering_agrees_with_one_hdbscan():
    x, truth = _blobs()
    whole = cluster_prompts([], embeddings=x, pca_components=None, partition_size=10_000)
    parts = cluster_prompts([], embeddings=x, pca_components=None, partition_size=100)
    assert adjusted_rand_score(truth, whole) > 0.95
    assert adjusted_rand_score(truth, parts) > 0.95
    assert len(set(parts[parts >= 0])) == pytest.approx(40, abs=3)  # labels are unique across partitions
    with pytest.raises(ValueError, match="partition_size"):
        cluster_prompts([], embeddings=x, partition_size=4)


@pytest.fixture()
def pixels(tmp_path):
    images = random_images(6, size=32, seed=1)
    for image_id, image in zip(range(1, 7), images, strict=True):
        if image_id != 6:  # 6 has no file
            image.save(tmp_path / f"{image_id}.png")
    (tmp_path / "5.png").write_bytes(b"truncated")  # 5 is unreadable
    return tmp_path


def test_scorer_scores_count_missing_and_unreadable_images(pixels):
    scorer = PickScore(*tiny_clip_model(seed=3))
    table = pd.DataFrame({"imageId": [1, 2, 3, 4, 5, 6], "prompt": ["a car"] * 3 + ["a dog"] * 3})
    scores, problems = scorer_scores(table, scorer, image_dir_loader(pixels), batch_size=4)
    assert problems == {"missing image": 1, "unreadable image": 1}
    assert scores.isna().tolist() == [False] * 4 + [True] * 2
    from PIL import Image

    direct = scorer.score(
        [Image.open(pixels / f"{i}.png").convert("RGB") for i in (1, 2, 3, 4)], ["a car"] * 3 + ["a dog"]
    )
    np.testing.assert_allclose(scores.iloc[:4].to_numpy(), direct.numpy(), rtol=1e-5)


def test_pairs_from_a_reward_model_and_the_exchange_format(pixels):
    scorer = PickScore(*tiny_clip_model(seed=3))
    prompts = ["a red car", "a red car", "a dog", "a dog", "a red car", "a dog"]
    table = pd.DataFrame({"imageId": [1, 2, 3, 4, 5, 6], "prompt": prompts})

    class TwoTopics:  # cars and dogs: two clusters
        def embed_texts(self, texts):
            topic = np.array([t == "a dog" for t in texts], dtype=int)
            return np.eye(2, 8, dtype=np.float32)[topic] + 1e-3 * np.arange(len(texts))[:, None]

    pairs = make_preference_pairs(
        table, scorer=scorer, locate=image_dir_loader(pixels), embedder=TwoTopics(), min_cluster_size=2
    )
    assert pairs.attrs["problems"] == {"missing image": 1, "unreadable image": 1}
    scores, _ = scorer_scores(table.iloc[:4], scorer, image_dir_loader(pixels))
    expected = [sorted(ids, key=lambda i: -scores[i - 1]) for ids in ([1, 2], [3, 4])]
    assert sorted(pairs[["chosen", "rejected"]].values.tolist()) == sorted(expected)
    assert pairs.score_name.tolist() == ["pickscore"] * 2
    assert sorted(pairs.topic) == ["cars", "dogs"]
    best = pairs.chosen.iloc[0]

    exchange = exchange_format(pd.concat([pairs.iloc[:1]] * 8, ignore_index=True), image_dir_loader(pixels), seed=0)
    assert exchange.column_names == ["jpg_0", "jpg_1", "label_0", "caption"]
    assert 0 < sum(exchange["label_0"]) < 8  # the winner's side is randomised
    prepared, dropped = prepare_dpo_dataset(exchange)
    assert dropped == {}
    assert all(row["image_w"] == (pixels / f"{best}.png").read_bytes() for row in prepared)


def test_make_pairs_needs_files_for_a_reward_model():
    table = pd.DataFrame({"imageId": [1], "prompt": ["x"]})
    with pytest.raises(ValueError, match="locate"):
        make_preference_pairs(table, scorer=PickScore(*tiny_clip_model(seed=3)))


def test_cli_pairs_with_a_reward_model_needs_image_files(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    pd.DataFrame({"imageId": [1], "prompt": ["x"]}).to_parquet(tmp_path / "images" / "train.parquet")
    assert main(["dataset", "pairs", str(tmp_path)]) == 2
    assert "--image-dir" in capsys.readouterr().err


def test_blank_prompts_are_never_paired():
    table = pd.DataFrame({"imageId": [1, 2, 3, 4], "prompt": ["a dog", "  ", "a dog", ""], "s": [0.1, 9.0, 0.5, 8.0]})

    class OneTopic:
        def embed_texts(self, texts):
            assert all(t.strip() for t in texts)  # blank prompts never reach the embedder
            return np.eye(2, 8, dtype=np.float32)[[0] * len(texts)] + 1e-3 * np.arange(len(texts))[:, None]

    with pytest.raises(ValueError, match="No images with a prompt"):
        make_preference_pairs(table.iloc[[1, 3]], score="s", embedder=OneTopic(), min_cluster_size=2)
    two_topics = pd.concat(
        [table, table.assign(imageId=table.imageId + 10, prompt=table.prompt.str.replace("dog", "car"))]
    )

    class TwoTopics:
        def embed_texts(self, texts):
            assert all(t.strip() for t in texts)
            topic = np.array(["car" in t for t in texts], dtype=int)
            return np.eye(2, 8, dtype=np.float32)[topic] + 1e-3 * np.arange(len(texts))[:, None]

    pairs = make_preference_pairs(two_topics, score="s", embedder=TwoTopics(), min_cluster_size=2)
    assert sorted(pairs[["chosen", "rejected"]].values.tolist()) == [[3, 1], [13, 11]]
