"""Full-ranking metrics for leave-one-out evaluation: Recall@k (= Hit@k), NDCG@k, MRR, average rank.

Ranks are pessimistic on ties: an item scoring exactly as high as the target is ranked above it, so ties
never favour the target (a constant scorer gets the worst rank, not a lucky one).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

MASKED = -np.inf


def target_ranks(scores: np.ndarray, targets: np.ndarray, exclude: sp.csr_matrix | None = None) -> np.ndarray:
    """1-based rank of each row's target among all items.

    Args:
        scores: (n_users, n_items) scores, higher is better.
        targets: (n_users,) target item index per row.
        exclude: Optional (n_users, n_items) binary matrix of items to mask (e.g. seen train items). The target
            is never masked; the same mask must be used for every model.

    Returns:
        (n_users,) int ranks, 1 = best.

    Example:
        ```python
        >>> import numpy as np
        >>> target_ranks(np.array([[0.1, 0.5, 0.5, 0.2]]), np.array([1])).tolist()
        [2]
        ```
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    if np.isnan(scores).any():
        raise ValueError("The model produced NaN scores; check its training (learning rate, inputs).")
    rows = np.arange(len(targets))
    if exclude is not None:
        excl = exclude.tocoo()
        keep = excl.col != targets[excl.row]
        scores[excl.row[keep], excl.col[keep]] = MASKED
    target_scores = scores[rows, targets][:, None]
    higher = (scores > target_scores).sum(axis=1)
    tied = (scores == target_scores).sum(axis=1) - 1  # other items tied with the target rank above it
    return (1 + higher + tied).astype(np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = (10, 50, 100)) -> dict[str, float]:
    """Recall@k, NDCG@k, HitRate@k, MRR, mean and std of rank from target ranks (leave-one-out).

    Example:
        ```python
        >>> m = metrics_from_ranks(np.array([1, 3]), ks=(2,))
        >>> m["recall@2"], round(m["ndcg@2"], 4), m["mrr"]
        (0.5, 0.5, 0.6666666666666666)
        ```
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        raise ValueError("No ranks to evaluate.")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"hit@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1), 0.0).mean())
    out["mrr"] = float((1.0 / ranks).mean())
    out["avg_rank"] = float(ranks.mean())
    out["rank_std"] = float(ranks.std())
    return out
