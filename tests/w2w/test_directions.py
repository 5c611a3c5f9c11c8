"""Directions: a planted direction is recovered from labels; edits move θ exactly by Σ α·v; debiasing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegem_hf.testing import tiny_sd_components
from imagegem_hf.w2w import Direction, WeightSpace, debias, lora_target_shapes, preference_direction
from imagegem_hf.w2w.demo import synthetic_loras


@pytest.fixture(scope="module")
def planted():
    shapes = lora_target_shapes(tiny_sd_components(seed=0)["unet"], ["to_q", "to_k", "to_v", "to_out.0"])
    loras, labels, direction = synthetic_loras(shapes, n=60, seed=1, noise=0.04)
    space = WeightSpace.build(loras, n_components=12, show_progress=False)
    return space, loras, labels, direction


@pytest.mark.parametrize("method", ["logistic", "svm", "lstsq"])
def test_planted_direction_is_recovered(planted, method):
    space, loras, labels, truth = planted
    direction = preference_direction(space, None, labels, method=method)
    assert np.isclose(np.linalg.norm(direction.vector), 1.0, atol=1e-5)
    assert float(direction.vector @ truth) > 0.9  # right sign too: +α moves towards label +1
    assert direction.accuracy >= 0.9 and direction.train_accuracy >= 0.9
    assert (direction.n_positive, direction.n_negative) == (30, 30)
    from_loras = preference_direction(space, loras, labels, method=method)  # projected here instead of stored
    assert float(from_loras.vector @ direction.vector) > 0.999


def test_edit_moves_coefficients_along_the_normal(planted):
    space, loras, labels, _ = planted
    direction = preference_direction(space, None, labels)
    theta = space.vectorize(loras[0])[0]
    coefficients = space.project(theta)
    for alpha in (0.5, 1.0, 2.0):
        moved = space.project(theta + alpha * direction.vector) - coefficients
        cosine = moved @ direction.normal / np.linalg.norm(moved)
        assert cosine > 0.999
        np.testing.assert_allclose(
            np.linalg.norm(moved),
            alpha * np.linalg.norm(space.project(theta + direction.vector) - coefficients),
            rtol=1e-3,
        )


def test_multi_direction_edit_is_theta_plus_sum(planted):
    space, loras, labels, _ = planted
    rng = np.random.default_rng(0)
    v1 = preference_direction(space, None, labels).vector
    v2 = rng.normal(size=space.vector_length).astype(np.float32)
    v2 /= np.linalg.norm(v2)
    edited = space.edit(loras[3], [v1, Direction(vector=v2, normal=np.zeros(1), method="lstsq")], [1.5, -0.5])
    expected = space.vectorize(loras[3])[0] + 1.5 * v1 - 0.5 * v2
    for name, n_out, n_in, _, offset in space.layout:
        module = edited.modules[name]
        torch.testing.assert_close(module.down.reshape(-1), torch.from_numpy(expected[offset : offset + n_in]))
        torch.testing.assert_close(
            module.up.reshape(-1), torch.from_numpy(expected[offset + n_in : offset + n_in + n_out])
        )
    unedited = space.edit(loras[3], v1, 0.0)
    reference = space.vector_to_lora(space.vectorize(loras[3])[0])
    for name in unedited.modules:
        torch.testing.assert_close(unedited.modules[name].delta_weight(), reference.modules[name].delta_weight())
    subspace = space.edit(loras[3], v1, 0.0, in_subspace=True)
    assert not torch.equal(subspace.modules[name].down, unedited.modules[name].down)
    with pytest.raises(ValueError, match="strengths"):
        space.edit(loras[3], [v1, v2], [1.0])


def _coefficients(space, vectors: np.ndarray) -> np.ndarray:
    """((θ − μ) / σ) · Vᵀ written out on the space's buffers, in float64."""
    mean, std = space.mean.double().numpy(), space.std.double().numpy()
    return ((np.asarray(vectors, dtype=np.float64) - mean) / std) @ space.components.double().numpy().T


def test_debias_leaves_the_other_classifiers_score_unchanged(planted):
    """weights2weights debiases in PCA-coefficient space: an edit along the debiased direction does not move the
    other attribute's classifier score (orthogonalising the σ-scaled weight vectors leaves it moving)."""
    from sklearn.linear_model import LogisticRegression

    space, loras, labels, _ = planted
    x = space.training_coefficients().astype(np.float64)
    z = x / x.std(0)
    mixed = z[:, 1] + 0.5 * z[:, 2] + 0.5 * z[:, 0]  # a second attribute, correlated with the first (PC 1)
    other_labels = np.where(mixed > np.median(mixed), 1, -1)
    direction = preference_direction(space, None, labels)
    other = preference_direction(space, None, other_labels)
    clean = debias(space, direction, [other])
    assert np.isclose(np.linalg.norm(clean.vector), 1.0, atol=1e-5) and clean.extra == {"debiased_against": 1}

    classifier = LogisticRegression(max_iter=5000).fit(x, other_labels)  # the other attribute's own classifier
    theta = np.stack([space.vectorize(lora)[0] for lora in loras[:5]])

    def score_change(vector: np.ndarray) -> np.ndarray:
        return classifier.decision_function(_coefficients(space, theta + vector)) - classifier.decision_function(
            _coefficients(space, theta)
        )

    raw, debiased = score_change(direction.vector), score_change(clean.vector)
    assert np.abs(raw).min() > 0.05  # the raw direction drags the other attribute along
    assert np.abs(debiased).max() < 1e-3 * np.abs(raw).max()
    assert float(clean.vector @ direction.vector) > 0.3  # what is left is still the attribute's direction


def test_debias_against_coefficient_and_weight_vectors(planted):
    space, _, labels, _ = planted
    rng = np.random.default_rng(1)
    direction = preference_direction(space, None, labels)
    weights = rng.normal(size=space.vector_length)
    normal = rng.normal(size=space.n_components)
    clean = debias(space, direction, [weights, normal, 2 * normal])  # the dependent third one is skipped
    assert clean.extra == {"debiased_against": 2}
    moved = _coefficients(space, clean.vector) - _coefficients(space, np.zeros(space.vector_length))
    for other in (_coefficients(space, weights) - _coefficients(space, np.zeros(space.vector_length)), normal):
        assert abs(float(moved @ other)) < 1e-4 * np.linalg.norm(moved) * np.linalg.norm(other)
    with pytest.raises(ValueError, match="span"):
        debias(space, direction, [direction])
    with pytest.raises(ValueError, match="length 3"):
        debias(space, direction, [np.ones(3)])


def test_direction_save_load(planted, tmp_path):
    space, _, labels, _ = planted
    direction = preference_direction(space, None, labels, method="svm", name="realistic")
    loaded = Direction.load(direction.save(tmp_path / "d.safetensors"))
    np.testing.assert_array_equal(loaded.vector, direction.vector)
    assert (loaded.method, loaded.name, loaded.accuracy) == ("svm", "realistic", direction.accuracy)


def test_bad_labels(planted):
    space, _, labels, _ = planted
    with pytest.raises(ValueError, match="one class"):
        preference_direction(space, None, np.ones_like(labels))
    with pytest.raises(ValueError, match="Labels must be"):
        preference_direction(space, None, np.arange(len(labels)))
    with pytest.raises(ValueError, match="labels for"):
        preference_direction(space, None, labels[:-2])
    with pytest.raises(ValueError, match="Unknown method"):
        preference_direction(space, None, labels, method="tree")
    few = np.array([1, 1] + [-1] * (len(labels) - 2))
    with pytest.raises(ValueError, match="Too few"):
        preference_direction(space, None, few)
    assert preference_direction(space, None, few, test_fraction=0).accuracy is None


@pytest.mark.parametrize("in_subspace", [False, True])
def test_toy_edits_start_from_the_lora_or_its_reconstruction(planted, in_subspace):
    from imagegem_hf.toy.w2w_edits import W2WToyConfig, edit_at_strengths

    space, loras, labels, _ = planted
    direction = preference_direction(space, None, labels)
    config = W2WToyConfig(in_subspace=in_subspace)
    edited = edit_at_strengths(space, loras[:2], direction, np.array([0.0, 1.0]), config)
    assert len(edited) == 4
    for k, lora in enumerate(loras[:2]):
        theta = space.vectorize(lora)[0].astype(np.float64)
        if in_subspace:  # p · V · σ + μ, written out
            std, mean = space.std.double().numpy(), space.mean.double().numpy()
            theta = _coefficients(space, theta) @ space.components.double().numpy() * std + mean
        for position, alpha in enumerate((0.0, 1.0)):
            got = space.vectorize(edited[position * 2 + k])[0]
            np.testing.assert_allclose(got, theta + alpha * direction.vector, atol=2e-5)
