"""Labels: the paper's style thresholds, HDBSCAN representatives, per-user top/bottom labelling, VLM descriptions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagegem_hf.embeddings import CLIPEmbedder
from imagegem_hf.testing import random_images, tiny_clip_model, tiny_vlm
from imagegem_hf.w2w.labels import (
    StyleLabelConfig,
    VLMDescriber,
    preference_labels,
    representative_images,
    style_labels,
)


class AxisEmbedder:
    """A tiny real embedder: texts map to fixed unit axes; an image's embedding is its normalised mean RGB."""

    AXES = {"a photo of a person": [1, 0, 0], "a realistic photo": [0, 1, 0], "an anime illustration": [0, 0, 1]}

    def embed_texts(self, texts):
        return np.array([self.AXES.get(t, [1, 1, 1]) for t in texts], dtype=np.float32) / np.array(
            [[1.0] if t in self.AXES else [np.sqrt(3)] for t in texts], dtype=np.float32
        )

    def embed_images(self, images):
        means = np.array([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images])
        return means / np.linalg.norm(means, axis=1, keepdims=True)


def _solid(rgb):
    return Image.new("RGB", (4, 4), tuple(int(c) for c in rgb))


def test_style_labels_follow_the_paper_thresholds():
    # embedding ∝ (person, realistic, anime) cosines, chosen around the thresholds 0.2 / 0.26 / 0.24
    cases = {
        "realistic": [0.5, 0.8, 0.1],
        "anime": [0.5, 0.1, 0.8],
        "both": [0.5, 0.6, 0.6],
        "no_person": [0.05, 0.9, 0.1],
        "neither": [0.9, 0.1, 0.1],
    }
    models = {k: [_solid(255 * np.array(v) / max(v))] for k, v in cases.items()}
    result = style_labels(models, AxisEmbedder())
    assert result.labels == {"realistic": 1, "anime": -1}
    assert result.dropped == {
        "both": "high on both styles",
        "no_person": "person score below threshold",
        "neither": "neither style above threshold",
    }
    for name, v in cases.items():  # scores are the cosines computed by hand
        rgb = np.trunc(255 * np.array(v) / max(v))
        expected = rgb / np.linalg.norm(rgb)
        got = result.scores[name]
        np.testing.assert_allclose([got["person"], got["realistic"], got["anime"]], expected, atol=1e-6)
    strict = style_labels(models, AxisEmbedder(), StyleLabelConfig(realistic_threshold=0.99))
    assert "realistic" not in strict.labels


def test_style_labels_with_tiny_clip_equal_direct_cosines():
    model, processor = tiny_clip_model(seed=0)
    embedder = CLIPEmbedder(model, processor)
    images = random_images(3, size=32, seed=4)
    result = style_labels({"m": images}, embedder, StyleLabelConfig(person_threshold=-1.0))
    import torch

    with torch.no_grad():
        text = model.get_text_features(**processor(text=["a realistic photo"], padding=True, return_tensors="pt"))
        pixels = processor(images=images, return_tensors="pt")
        image = model.get_image_features(**pixels)
    from imagegem_hf.embeddings import clip_features

    t = clip_features(text)[0].numpy()
    i = clip_features(image).numpy()
    expected = np.mean((i / np.linalg.norm(i, axis=1, keepdims=True)) @ (t / np.linalg.norm(t)))
    assert result.scores["m"]["realistic"] == pytest.approx(expected, abs=1e-5)


def test_representative_images_come_from_the_main_cluster():
    rng = np.random.default_rng(0)
    main = rng.normal(size=(20, 8)) * 0.05 + np.eye(8)[0]
    side = rng.normal(size=(8, 8)) * 0.05 + np.eye(8)[1]
    scattered = rng.normal(size=(4, 8))
    embeddings = np.vstack([side, main, scattered])
    indices, size, clustered = representative_images(embeddings, n=9, min_cluster_size=5)
    assert clustered and size >= 20
    assert all(8 <= i < 28 for i in indices)
    # the same selection written out with sklearn directly
    from sklearn.cluster import HDBSCAN

    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    assignment = HDBSCAN(min_cluster_size=5, copy=True).fit_predict(unit)
    members = np.flatnonzero(assignment == np.bincount(assignment[assignment >= 0]).argmax())
    assert len(members) == size
    order = np.argsort(np.linalg.norm(unit[members] - unit[members].mean(0), axis=1), kind="stable")
    assert indices == members[order[:9]].tolist()
    few, size_few, clustered_few = representative_images(embeddings[:3], n=9, min_cluster_size=5)
    assert not clustered_few and sorted(few) == [0, 1, 2] and size_few == 3


def test_preference_labels_rank_models_by_similarity_to_the_description():
    embedder = AxisEmbedder()
    user = [_solid((250, 10, 10)) for _ in range(12)]
    # description "a realistic photo" → axis (0, 1, 0): green-heavy models are preferred
    models = {f"m{g}": [_solid((40, g, 40))] for g in (10, 60, 120, 250, 200, 30, 90, 160)}
    result = preference_labels(user, models, embedder, description="a realistic photo", top_fraction=0.25)
    assert result.labels == {"m250": 1, "m200": 1, "m10": -1, "m30": -1}
    assert result.description == "a realistic photo" and len(result.representative) == 9
    with pytest.raises(ValueError, match="describer"):
        preference_labels(user, models, embedder)
    with pytest.raises(ValueError, match="top_fraction"):
        preference_labels(user, models, embedder, description="x", top_fraction=0.7)


def test_preference_labels_with_tiny_clip_and_tiny_vlm_description():
    embedder = CLIPEmbedder(*tiny_clip_model(seed=1))
    vlm, vlm_processor = tiny_vlm(seed=0)
    seen = []

    def describe(images):
        seen.append(len(images))
        return VLMDescriber(vlm, vlm_processor, max_new_tokens=5)([im.resize((16, 16)) for im in images])

    models = {f"m{i}": random_images(2, size=32, seed=10 + i) for i in range(6)}
    result = preference_labels(random_images(12, size=32, seed=3), models, embedder, describer=describe)
    assert seen == [9] and isinstance(result.description, str)
    assert sorted(result.labels.values()) == [-1, 1]
    best = max(result.similarities, key=result.similarities.get)
    assert result.labels[best] == 1


def test_attribute_labels_split_by_the_measured_value():
    from imagegem_hf.w2w.labels import attribute_labels

    scores = {"m0": 0.3, "m1": -0.1, "m2": 0.9, "m3": 0.0, "m4": 0.5, "m5": -0.7}
    assert attribute_labels(scores) == {"m2": 1, "m4": 1, "m0": 1, "m3": -1, "m1": -1, "m5": -1}
    assert attribute_labels(scores, top_fraction=1 / 3) == {"m2": 1, "m4": 1, "m1": -1, "m5": -1}
    with pytest.raises(ValueError, match="top_fraction"):
        attribute_labels(scores, top_fraction=0.7)
