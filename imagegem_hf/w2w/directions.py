"""Preference directions in a `WeightSpace` (ImageGem §4.3, §5.3).

A linear classifier on the PCA coefficients of labelled LoRAs (±1, e.g. anime → realistic, or a user's taste)
gives a normal vector `w`; mapped to weight space as `(w · V) · σ` and unit-normalised it is the edit direction
`v`, so that θ + α·v moves a LoRA towards label +1 by `α` in weight-space norm (weights2weights leaves `v`
unnormalised, which is why its edit strengths are in the thousands). `debias` projects other directions' normals
(e.g. a gender direction) out of the coefficient-space normal, so that an edit does not move their classifiers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from imagegem_hf.w2w.space import LoRAItem, WeightSpace

METHODS = ("logistic", "svm", "lstsq")


@dataclass
class Direction:
    """A unit direction in a weight space, with how it was learnt.

    Attributes:
        vector: Unit vector of length `space.vector_length` (weight space).
        normal: The classifier's normal in PCA-coefficient space (length `m`).
        method: `"logistic"`, `"svm"`, `"lstsq"` or `"debiased"`.
        accuracy: Held-out classifier accuracy (`None` when no hold-out was used).
        train_accuracy: Accuracy of the final classifier on all labelled LoRAs.
        n_positive / n_negative: Number of labelled LoRAs of each class.
        name: A label for figures and file names.
    """

    vector: np.ndarray
    normal: np.ndarray
    method: str
    accuracy: float | None = None
    train_accuracy: float | None = None
    n_positive: int = 0
    n_negative: int = 0
    name: str = "direction"
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the direction as safetensors (`vector`, `normal`) with the rest in the header metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {k: getattr(self, k) for k in ("method", "accuracy", "train_accuracy", "n_positive", "n_negative")}
        info.update(name=self.name, extra=self.extra)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(
            {"vector": torch.from_numpy(self.vector.astype(np.float32)), "normal": torch.from_numpy(self.normal)},
            str(tmp),
            metadata={"imagegem_hf_direction": json.dumps(info)},
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Direction:
        """Read a direction written by `save`.

        Example:
            ```python
            >>> from imagegem_hf.w2w import Direction
            >>> direction = Direction.load("realistic.safetensors")  # doctest: +SKIP
            ```
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            info = json.loads((handle.metadata() or {}).get("imagegem_hf_direction", "{}"))
        if not info:
            raise ValueError(f"{path} is not a direction file written by Direction.save.")
        tensors = load_file(str(path))
        return cls(vector=tensors["vector"].numpy(), normal=tensors["normal"].numpy(), **info)


def _signed_labels(labels: Sequence) -> np.ndarray:
    y = np.asarray(labels)
    values = set(np.unique(y).tolist())
    if values <= {-1, 1}:
        signed = y.astype(np.int64)
    elif values <= {0, 1} or values <= {False, True}:
        signed = np.where(y.astype(bool), 1, -1)
    else:
        raise ValueError(f"Labels must be ±1 (or 0/1, bool); got values {sorted(values)[:5]}.")
    if len(set(signed.tolist())) < 2:
        raise ValueError("Labels hold only one class; a direction needs both positive and negative LoRAs.")
    return signed


def _fit_normal(x: np.ndarray, y: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, float, Any]:
    """The classifier's normal `w` and bias `b` (decision w·x + b, positive → +1)."""
    if method == "logistic":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(x, y)
        return model.coef_[0], float(model.intercept_[0]), model
    if method == "svm":
        from sklearn.svm import LinearSVC

        model = LinearSVC(C=1.0, max_iter=20000, random_state=seed).fit(x, y)
        return model.coef_[0], float(model.intercept_[0]), model
    if method == "lstsq":
        design = np.hstack([x, np.ones((len(x), 1))])
        solution, *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)
        return solution[:-1], float(solution[-1]), None
    raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")


def _accuracy(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.where(x @ w + b > 0, 1, -1) == y))


def preference_direction(
    space: WeightSpace,
    loras_or_coefficients: Sequence[LoRAItem] | np.ndarray | None,
    labels: Sequence,
    method: str = "logistic",
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str = "direction",
) -> Direction:
    """Learn a unit edit direction from binary labels with a linear classifier in PCA space.

    Args:
        space: The weight space.
        loras_or_coefficients: The labelled LoRAs (files, `LoRA`s or vectors, projected here), their PCA
            coefficients `(n, m)`, or `None` for the LoRAs the space was built from (`space.coefficients`).
        labels: One label per LoRA: ±1, 0/1 or bool; +1 is the side that positive strengths move towards.
        method: `"logistic"` (logistic regression), `"svm"` (linear SVM) or `"lstsq"` (least squares on ±1, as in
            weights2weights).
        test_fraction: Fraction held out (stratified) to report `accuracy`; 0 skips the hold-out. The returned
            direction is always fitted on all labelled LoRAs.
        seed: Seed of the split and the solvers.
        name: Name stored with the direction.

    Returns:
        A `Direction` with a unit weight-space `vector`, the coefficient-space `normal`, and accuracies.

    Example:
        ```python
        >>> from imagegem_hf.w2w import WeightSpace, preference_direction
        >>> space = WeightSpace.from_pretrained("w2w_space")  # doctest: +SKIP
        >>> direction = preference_direction(space, None, labels, method="logistic")  # doctest: +SKIP
        >>> round(direction.accuracy, 2)  # doctest: +SKIP
        0.93
        ```
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    if loras_or_coefficients is None:
        x = space.training_coefficients().astype(np.float64)
    elif (
        isinstance(loras_or_coefficients, np.ndarray)
        and loras_or_coefficients.ndim == 2
        and (loras_or_coefficients.shape[1] == space.n_components)
    ):
        x = loras_or_coefficients.astype(np.float64)
    else:
        x = np.asarray(space.project(list(loras_or_coefficients)), dtype=np.float64)
    y = _signed_labels(labels)
    if len(y) != len(x):
        raise ValueError(f"Got {len(y)} labels for {len(x)} LoRAs.")
    accuracy = None
    if test_fraction > 0:
        from sklearn.model_selection import train_test_split

        if min(np.sum(y == 1), np.sum(y == -1)) * test_fraction < 1:
            raise ValueError(
                f"Too few LoRAs per class ({np.sum(y == 1)} positive, {np.sum(y == -1)} negative) to hold out "
                f"{test_fraction:.0%}; label more LoRAs or pass test_fraction=0."
            )
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_fraction, stratify=y, random_state=seed
        )
        w, b, _ = _fit_normal(x_train, y_train, method, seed)
        accuracy = _accuracy(w, b, x_test, y_test)
    w, b, _ = _fit_normal(x, y, method, seed)
    return Direction(
        vector=space.coefficient_direction_to_weights(w),
        normal=(w / np.linalg.norm(w)).astype(np.float32),
        method=method,
        accuracy=accuracy,
        train_accuracy=_accuracy(w, b, x, y),
        n_positive=int(np.sum(y == 1)),
        n_negative=int(np.sum(y == -1)),
        name=name,
    )


def debias(space: WeightSpace, direction: Direction, others: Sequence[Direction | np.ndarray]) -> Direction:
    """Remove from `direction` the effect of its edits on other directions' classifiers, in PCA-coefficient space.

    Moving a LoRA by `α · v` moves its PCA coefficients by `α · c(v)` with `c(v) = (v / σ) · Vᵀ`, so the score
    `w · p + b` of another linear classifier changes by `α · w · c(v)`. weights2weights therefore debiases in
    coefficient space: the coefficient normal is orthogonalised (Gram–Schmidt) against the other directions'
    normals and mapped back to weight space with `space.coefficient_direction_to_weights`. Every classifier in
    `others` then scores an edited LoRA exactly as the unedited one. (Orthogonalising the σ-scaled weight-space
    vectors instead does not: it leaves `w · c(v)` nonzero, and can even increase it.)

    Args:
        space: The weight space the directions live in.
        direction: The direction to clean.
        others: Directions whose classifier scores must not move: `Direction`s (their `normal` is used),
            coefficient-space normals (length `m`), or weight-space vectors (length `space.vector_length`, mapped
            to `c(v)`). Directions in the span of earlier ones are skipped.

    Returns:
        A unit `Direction` (`method="debiased"`) whose `normal` is orthogonal to every other normal.

    Raises:
        ValueError: `direction` lies in the span of `others`.

    Example:
        ```python
        >>> realistic_only = debias(space, realistic, [gender, age])  # doctest: +SKIP
        ```
    """
    components, std = space.components.detach().double().cpu().numpy(), space.std.detach().double().cpu().numpy()
    basis: list[np.ndarray] = []
    for other in others:
        normal = np.asarray(getattr(other, "normal", other), dtype=np.float64)
        if normal.shape == (space.vector_length,):
            normal = (normal / std) @ components.T
        if normal.shape != (space.n_components,):
            raise ValueError(
                f"Cannot debias against a vector of length {normal.shape[0]}: pass a Direction, a coefficient normal "
                f"(length {space.n_components}) or a weight-space vector (length {space.vector_length})."
            )
        for b in basis:
            normal = normal - (normal @ b) * b
        norm = np.linalg.norm(normal)
        if norm > 1e-8:
            basis.append(normal / norm)
    normal = np.asarray(direction.normal, dtype=np.float64)
    normal = normal / np.linalg.norm(normal)
    for b in basis:
        normal = normal - (normal @ b) * b
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise ValueError("The direction lies in the span of the others; nothing is left after debiasing.")
    normal = normal / norm
    return Direction(
        vector=space.coefficient_direction_to_weights(normal),
        normal=normal.astype(np.float32),
        method="debiased",
        accuracy=direction.accuracy,
        train_accuracy=direction.train_accuracy,
        n_positive=direction.n_positive,
        n_negative=direction.n_negative,
        name=f"{direction.name}_debiased",
        extra={"debiased_against": len(basis)},
    )
