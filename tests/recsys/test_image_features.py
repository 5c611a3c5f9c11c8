import io

import numpy as np
import pandas as pd
import pytest

from imagegem_hf.cli import main
from imagegem_hf.embeddings import CLIPEmbedder
from imagegem_hf.recsys import InteractionData, TwoTower, image_features
from imagegem_hf.recsys.evaluate import RandomRecommender, evaluate_models
from imagegem_hf.recsys.image_features import clip_image_features, default_cache_dir, image_item_features
from imagegem_hf.testing import random_images, tiny_clip_model


def _write_dataset(folder, image_ids, users, embeddings=None, images=None):
    """An ImageGem-shaped folder: `images` (optionally pixels / an embedding column) and image `interactions`."""
    (folder / "images").mkdir(parents=True)
    (folder / "interactions").mkdir()
    table = pd.DataFrame({"imageId": image_ids, "prompt": [f"image {i}" for i in image_ids]})
    if embeddings is not None:
        table["clip_embedding"] = list(embeddings.astype(np.float32))
    if images is not None:
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        table["image"] = encoded
    table.to_parquet(folder / "images" / "part-0.parquet")
    pd.DataFrame(
        {
            "userHash": users,
            "itemType": "image",
            "itemId": image_ids,
            "timestamp": np.arange(len(image_ids)),
        }
    ).to_parquet(folder / "interactions" / "part-0.parquet")
    return folder


class _CountingEmbedder:
    def __init__(self, embedder):
        self.embedder, self.embedded = embedder, 0

    def embed_images(self, images):
        self.embedded += len(images)
        return self.embedder.embed_images(images)


def test_clip_image_features_match_direct_embedding_and_resume_from_the_cache(tmp_path, monkeypatch):
    images = random_images(10, size=32)
    dataset = _write_dataset(tmp_path / "dataset", np.arange(100, 110), ["u"] * 10, images=images)
    embedder = CLIPEmbedder(*tiny_clip_model(), batch_size=3)
    counting = _CountingEmbedder(embedder)
    monkeypatch.setattr(image_features, "CACHE_PART_SIZE", 4)
    cache = default_cache_dir(dataset, "tiny/clip")
    assert cache == tmp_path / "dataset.image_embeddings" / "tiny--clip"  # next to the dataset

    wanted = np.array([109, 100, 105, 101, 102, 103, 104, 106, 107, 108])
    features = clip_image_features(dataset, wanted, counting, cache)
    direct = embedder.embed_images([images[i - 100] for i in wanted])
    np.testing.assert_allclose(features.loc[wanted].to_numpy(), direct, atol=1e-5)
    assert counting.embedded == 10 and len(list(cache.glob("part-*.parquet"))) == 3

    sorted(cache.glob("part-*.parquet"))[-1].unlink()  # as if killed before the last part was written
    counting.embedded = 0
    resumed = clip_image_features(dataset, wanted, counting, cache)
    assert counting.embedded == 2  # only the lost part is embedded again
    np.testing.assert_allclose(resumed.loc[wanted].to_numpy(), direct, atol=1e-5)
    clip_image_features(dataset, wanted, counting, cache)
    assert counting.embedded == 2  # everything cached

    with pytest.raises(ValueError, match="no pixels"):
        clip_image_features(_write_dataset(tmp_path / "bare", [1], ["u"]), [1], counting, tmp_path / "c2")


def test_recommend_cli_embeds_stored_pixels_with_clip(tmp_path, capsys):
    model, processor = tiny_clip_model()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    ids = np.arange(24)
    users = [f"u{i % 4}" for i in ids]
    dataset = _write_dataset(tmp_path / "dataset", ids, users, images=random_images(24, size=32))
    out = tmp_path / "out"
    args = ["recommend", str(dataset), "--item-type", "image", "--models", "pop,twotower", "--k", "1,5"]
    assert main([*args, "--clip-model", str(tmp_path / "clip"), "--output-dir", str(out)]) == 0
    assert "| twotower |" in capsys.readouterr().out
    cache = default_cache_dir(dataset, str(tmp_path / "clip"))
    cached = pd.read_parquet(cache)
    assert sorted(cached["imageId"]) == ids.tolist() and len(cached["embedding"][0]) == 8


def test_image_embedding_column_lets_two_tower_retrieve_unseen_images(tmp_path, capsys):
    # 10 clusters of 30 images; each user uploads 5 images of one cluster, so every test image is unseen in
    # training and only its embedding tells which users it fits.
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 16))
    clusters = np.repeat(np.arange(10), 30)
    embeddings = centers[clusters] + 0.05 * rng.normal(size=(300, 16))
    ids = np.arange(300)
    users = [f"u{c}_{(i % 30) // 5}" for i, c in zip(ids, clusters, strict=True)]
    dataset = _write_dataset(tmp_path / "dataset", ids, users, embeddings=embeddings)
    data = InteractionData.from_table(dataset, item_type="image")
    features = image_item_features(dataset, data.item_ids, embedding_column="clip_embedding")
    np.testing.assert_allclose(features.loc[ids].to_numpy(), embeddings, rtol=1e-6)
    models = {
        "random": RandomRecommender(),
        "twotower": TwoTower(item_features=features, max_steps=150),
        "control": TwoTower(max_steps=150),  # no embeddings: items start at random
    }
    metrics = evaluate_models(data, models, ks=(10,)).metrics
    assert metrics["twotower"]["test"]["recall@10"] > 0.25  # a user's cluster holds 30 images
    assert metrics["control"]["test"]["recall@10"] < 0.12  # chance is 10/296
    assert metrics["random"]["test"]["recall@10"] < 0.12
    common = ["recommend", str(dataset), "--item-type", "image", "--models", "twotower"]
    assert main([*common, "--image-embedding-column", "nope", "--output-dir", str(tmp_path / "out")]) == 2
    assert "has no column 'nope'" in capsys.readouterr().err
