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


def sparse_target_ranks(
    scores: sp.csr_matrix, targets: np.ndarray, exclude: sp.csr_matrix | None = None
) -> np.ndarray:
    """`target_ranks` for sparse, non-negative scores (absent entries score 0), without densifying rows.

    Same semantics as `target_ranks`: ties rank above the target and masked items (other than the target) rank
    below everything. Used for neighbourhood models over large catalogues (e.g. 1M items).

    Example:
        ```python
        >>> import scipy.sparse as sp
        >>> sparse_target_ranks(sp.csr_matrix(np.array([[0.0, 0.5, 0.5, 0.2]])), np.array([1])).tolist()
        [2]
        ```
    """
    scores = scores.tocsr()
    if scores.nnz and scores.data.min() < 0:
        raise ValueError("sparse_target_ranks needs non-negative scores; use target_ranks for signed scores.")
    n_items = scores.shape[1]
    exclude = exclude.tocsr() if exclude is not None else None
    ranks = np.empty(len(targets), dtype=np.int64)
    for row, target in enumerate(targets):
        cols = scores.indices[scores.indptr[row] : scores.indptr[row + 1]]
        vals = scores.data[scores.indptr[row] : scores.indptr[row + 1]]
        masked = np.zeros(0, dtype=cols.dtype)
        if exclude is not None:
            masked = exclude.indices[exclude.indptr[row] : exclude.indptr[row + 1]]
            masked = masked[masked != target]
            keep = ~np.isin(cols, masked)
            cols, vals = cols[keep], vals[keep]
        hit = cols == target
        target_score = vals[hit][0] if hit.any() else 0.0
        others = vals[~hit]
        higher = int((others > target_score).sum())
        tied = int((others == target_score).sum())
        if target_score == 0.0:  # every unmasked item without a stored score ties at 0
            tied += n_items - len(masked) - len(cols) - (0 if hit.any() else 1)
        ranks[row] = 1 + higher + tied
    return ranks
