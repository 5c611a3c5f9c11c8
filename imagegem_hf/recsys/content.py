"""Content vectors for items that have (almost) no interactions, such as ImageGem images (each image is uploaded
once, so pure collaborative filtering has nothing to go on): LSA of the items' prompts."""

from __future__ import annotations

import numpy as np
import pandas as pd


def prompt_vectors(item_ids: np.ndarray, prompts: pd.Series, dim: int = 64, seed: int = 0) -> np.ndarray:
    """(len(item_ids), dim) L2-normalised LSA (TF-IDF + truncated SVD) vectors of each item's prompt.

    Args:
        item_ids: Item ids in model order (e.g. `InteractionData.item_ids`).
        prompts: Prompt per item id (a Series indexed by item id); missing prompts give zero vectors.
        dim: Output dimension.
        seed: Seed of the randomized SVD.

    Example:
        ```python
        >>> import numpy as np, pandas as pd
        >>> v = prompt_vectors(np.array([1, 2, 3]), pd.Series({1: "red car", 2: "red car fast", 3: "a dog"}), dim=2)
        >>> v.shape
        (3, 2)
        ```
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = prompts.reindex(item_ids).fillna("").astype(str).tolist()
    tfidf = TfidfVectorizer(min_df=1, max_features=50_000).fit_transform(texts)
    dim = min(dim, tfidf.shape[1] - 1, len(texts) - 1)
    vectors = TruncatedSVD(dim, random_state=seed).fit_transform(tfidf).astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
