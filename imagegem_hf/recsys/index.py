"""Top-k retrieval by inner product: FAISS (exact `IndexFlatIP` for evaluation; HNSW/IVF for serving; GPU when
FAISS sees one), or an exact numpy implementation when FAISS is not installed."""

from __future__ import annotations

import numpy as np


class RetrievalIndex:
    """Inner-product top-k over item vectors.

    Args:
        item_vectors: (n_items, d) float32.
        kind: `"flat"` (exact, for evaluation), `"hnsw"` or `"ivf"` (approximate, for serving), or `"numpy"`
            (exact, no FAISS).
        nlist: IVF lists (for `"ivf"`).

    Example:
        ```python
        >>> import numpy as np
        >>> from imagegem_hf.recsys.index import RetrievalIndex
        >>> index = RetrievalIndex(np.eye(3, dtype=np.float32))
        >>> index.search(np.array([[0.0, 1.0, 0.0]], dtype=np.float32), k=1)[1].tolist()
        [[1]]
        ```
    """

    def __init__(self, item_vectors: np.ndarray, kind: str = "flat", nlist: int = 1024) -> None:
        if kind not in ("flat", "hnsw", "ivf", "numpy"):
            raise ValueError(f"kind must be 'flat', 'hnsw', 'ivf' or 'numpy', got {kind!r}.")
        self.vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.kind = kind
        if kind == "numpy":
            return
        try:
            import faiss
        except ImportError as err:
            raise ImportError(
                "FAISS is not installed: `pip install faiss-cpu` (or faiss-gpu-cu12), or use kind='numpy'."
            ) from err
        d = self.vectors.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(d), d, min(nlist, len(self.vectors)), faiss.METRIC_INNER_PRODUCT
            )
            index.train(self.vectors)
        if faiss.get_num_gpus() > 0 and kind != "hnsw":
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(self.vectors)
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, item_indices)`, each (n_queries, k), best first."""
        if k > len(self.vectors):
            raise ValueError(f"k={k} is larger than the catalogue ({len(self.vectors)} items).")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind != "numpy":
            return self.index.search(queries, k)
        scores = queries @ self.vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.lexsort((top, -np.take_along_axis(scores, top, 1)), axis=1)
        top = np.take_along_axis(top, order, 1)
        return np.take_along_axis(scores, top, 1), top
