"""Popularity and neighbourhood recommenders on sparse matrices (no dense item × item matrix is ever built)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from imagegem_hf.recsys.base import Recommender
from imagegem_hf.recsys.data import InteractionData


def _history(model: Recommender, history: InteractionData | None) -> sp.csr_matrix:
    model._check_fitted()
    return (history or model.train).csr()


def top_k_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the `k` largest entries of each row (ties: lower column index first)."""
    matrix = matrix.tocsr()
    matrix.sort_indices()
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    lengths = np.diff(indptr)
    if lengths.max(initial=0) <= k:
        return matrix
    keep = np.zeros(len(data), dtype=bool)
    for row in np.flatnonzero(lengths):
        start, end = indptr[row], indptr[row + 1]
        if end - start <= k:
            keep[start:end] = True
        else:
            order = np.lexsort((indices[start:end], -data[start:end]))[:k]
            keep[start + order] = True
    rows = np.repeat(np.arange(matrix.shape[0]), lengths)[keep]
    return sp.csr_matrix((data[keep], (rows, indices[keep])), shape=matrix.shape)


def cosine_neighbours(x: sp.csr_matrix, k: int, shrink: float) -> sp.csr_matrix:
    """Top-`k` cosine neighbours between the columns of `x`: `xᵀx / (‖a‖‖b‖ + shrink)`, diagonal removed."""
    x = x.tocsc().astype(np.float32)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0)).ravel())
    co = (x.T @ x).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    coo = co.tocoo()
    coo.data = coo.data / (norms[coo.row] * norms[coo.col] + shrink)
    return top_k_per_row(coo.tocsr(), k)


class Pop(Recommender):
    """Most popular items (training interaction counts), the same list for everyone."""

    name = "pop"

    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> Pop:
        self._remember(train)
        self.counts = np.bincount(train.item_index, minlength=train.n_items).astype(np.float32)
        return self

    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        self._check_fitted()
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()

    def state(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.counts = state["counts"]


class ItemKNN(Recommender):
    """Item-based collaborative filtering: cosine item–item similarity with shrinkage, top-k neighbours.

    Args:
        k: Neighbours kept per item.
        shrink: Added to the cosine denominator (damps similarities of rare items).

    Example:
        ```python
        >>> from imagegem_hf.recsys import ItemKNN
        >>> model = ItemKNN(k=50).fit(train)  # doctest: +SKIP
        >>> model.recommend([0, 1], k=10)  # doctest: +SKIP
        ```
    """

    name = "itemknn"
    config_keys = ("k", "shrink")

    def __init__(self, k: int = 100, shrink: float = 10.0) -> None:
        super().__init__()
        self.k, self.shrink = k, shrink

    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> ItemKNN:
        self._remember(train)
        self.similarity = cosine_neighbours(train.csr(), self.k, self.shrink)
        return self

    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        return (_history(self, history)[users] @ self.similarity.T).toarray()

    def state(self) -> dict[str, np.ndarray]:
        s = self.similarity
        return {"sim.indptr": s.indptr, "sim.indices": s.indices, "sim.data": s.data}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        n = len(self.item_ids)
        self.similarity = sp.csr_matrix((state["sim.data"], state["sim.indices"], state["sim.indptr"]), shape=(n, n))


class UserKNN(Recommender):
    """User-based collaborative filtering: cosine user–user similarity with shrinkage, top-k neighbours.

    Args:
        k: Neighbours kept per user.
        shrink: Added to the cosine denominator.
    """

    name = "userknn"
    config_keys = ("k", "shrink")

    def __init__(self, k: int = 100, shrink: float = 10.0) -> None:
        super().__init__()
        self.k, self.shrink = k, shrink

    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> UserKNN:
        self._remember(train)
        self.similarity = cosine_neighbours(train.csr().T.tocsr(), self.k, self.shrink)
        return self

    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        return (self.similarity[users] @ _history(self, history)).toarray()

    state = ItemKNN.state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        n = len(self.user_ids)
        self.similarity = sp.csr_matrix((state["sim.data"], state["sim.indices"], state["sim.indptr"]), shape=(n, n))
