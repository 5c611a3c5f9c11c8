"""Preference pairs from the `images` config (ImageGem §4.1): cluster prompts, then pair winners and losers.

Prompts are embedded (any `TextEmbedder`; default the offline all-MiniLM-L6-v2), L2-normalised, reduced with PCA
and clustered with HDBSCAN (`sklearn.cluster.HDBSCAN`). Within each cluster, images are ranked by a score and
paired min-max: the best with the worst, the second best with the second worst, and so on, while the margin
exceeds `min_margin`. The score is any numeric column (e.g. a precomputed HPSv2 score) or `"reactions"`, the
implicit-feedback score of `reaction_scores`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imagegem_hf.data.schema import PREFERENCE_PAIRS_COLUMNS, features_for
from imagegem_hf.embeddings import TextEmbedder, l2_normalize

TOPIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    "cars": ("car", "cars", "vehicle", "automobile", "race track"),
    "dogs": ("dog", "dogs", "puppy", "corgi", "husky", "retriever"),
    "scenery": ("landscape", "scenery", "mountain", "lake", "forest", "waterfall", "sunset", "meadow"),
}
HUMAN_WORDS = ("girl", "boy", "woman", "man", "person", "portrait", "character", "people", "warrior", "wizard")


def reaction_scores(images: pd.DataFrame) -> pd.Series:
    """Implicit-feedback score per image: (likes + hearts) divided by the uploader's median (likes + hearts) + 1.

    Normalising by the uploader's typical engagement keeps popular accounts from winning every pair: an image
    scores high when it did better than its own uploader's usual images.

    Example:
        ```python
        >>> import pandas as pd
        >>> df = pd.DataFrame({"userHash": ["a", "a", "b"], "likeCount": [1, 9, 3], "heartCount": [0, 1, 0]})
        >>> reaction_scores(df).round(2).tolist()
        [0.15, 1.54, 0.75]
        ```
    """
    engagement = images["likeCount"].fillna(0) + images["heartCount"].fillna(0)
    typical = engagement.groupby(images["userHash"]).transform("median")
    return (engagement / (typical + 1.0)).astype("float32")


def cluster_prompts(
    prompts: list[str],
    embedder: TextEmbedder | None = None,
    *,
    embeddings: np.ndarray | None = None,
    pca_components: int | None = 32,
    min_cluster_size: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """HDBSCAN cluster label per prompt (−1 = noise).

    Args:
        prompts: The prompts (ignored when `embeddings` is given).
        embedder: Text embedder; default `SentenceTransformerEmbedder()` (offline all-MiniLM-L6-v2).
        embeddings: Precomputed embeddings, one row per prompt.
        pca_components: Reduce to this many PCA components before clustering (`None` keeps all).
        min_cluster_size: HDBSCAN's minimum cluster size.
        seed: Seed of the randomized PCA.

    Example:
        ```python
        >>> labels = cluster_prompts(["a red car", "a blue car", "a dog"] * 5, min_cluster_size=3)  # doctest: +SKIP
        ```
    """
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    if embeddings is None:
        if embedder is None:
            from imagegem_hf.embeddings import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder()
        embeddings = embedder.embed_texts(prompts)
    x = l2_normalize(embeddings)
    if pca_components is not None and x.shape[1] > pca_components and len(x) > pca_components:
        x = PCA(pca_components, svd_solver="randomized", random_state=seed).fit_transform(x)
    return HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(x).astype(np.int32)


def topic_of(prompt: str | None) -> str:
    """The topic subset (ImageGem Table 2) of a prompt: "cars", "dogs", "scenery", or "" (none, or has humans)."""
    if not prompt:
        return ""
    words = set(prompt.lower().replace(",", " ").split())
    text = prompt.lower()
    if any(w in words for w in HUMAN_WORDS):
        return ""
    for topic, keywords in TOPIC_KEYWORDS.items():
        if any((k in text) if " " in k else (k in words) for k in keywords):
            return topic
    return ""


def min_max_pairs(
    images: pd.DataFrame,
    score_col: str,
    cluster_col: str = "cluster_id",
    pairs_per_cluster: int = 1,
    min_margin: float = 0.0,
    score_name: str | None = None,
) -> pd.DataFrame:
    """Min-max pairs within each cluster, in the `preference_pairs` schema.

    Images are sorted by score (ties by `imageId`); the k-th best is paired with the k-th worst for
    k < `pairs_per_cluster` while best − worst > `min_margin`. Noise (cluster −1) is never paired.

    Args:
        images: Rows with `imageId`, `prompt`, `score_col` and `cluster_col`.
        score_col: Column with the score (higher = preferred).
        cluster_col: Column with the cluster label.
        pairs_per_cluster: Pairs at most per cluster.
        min_margin: Minimum score difference for a pair.
        score_name: Stored in `score_name` (default `score_col`).

    Example:
        ```python
        >>> import pandas as pd
        >>> df = pd.DataFrame({"imageId": [1, 2, 3], "prompt": ["a", "b", "c"], "s": [0.1, 0.9, 0.5],
        ...                    "cluster_id": [0, 0, 0]})
        >>> min_max_pairs(df, "s")[["chosen", "rejected"]].values.tolist()
        [[2, 1]]
        ```
    """
    rows = []
    valid = images[images[cluster_col] >= 0].sort_values([cluster_col, score_col, "imageId"], kind="stable")
    for cluster, group in valid.groupby(cluster_col, sort=True):
        group = group.drop_duplicates("imageId")
        for k in range(min(pairs_per_cluster, len(group) // 2)):
            best, worst = group.iloc[len(group) - 1 - k], group.iloc[k]
            if best[score_col] - worst[score_col] <= min_margin:
                break
            rows.append(
                {
                    "prompt": best["prompt"] or "",
                    "chosen": int(best["imageId"]),
                    "rejected": int(worst["imageId"]),
                    "chosen_score": float(best[score_col]),
                    "rejected_score": float(worst[score_col]),
                    "score_name": score_name or score_col,
                    "cluster_id": int(cluster),
                    "topic": topic_of(best["prompt"]),
                }
            )
    return pd.DataFrame(rows, columns=list(PREFERENCE_PAIRS_COLUMNS))


def make_preference_pairs(
    images: pd.DataFrame,
    *,
    score: str = "reactions",
    embedder: TextEmbedder | None = None,
    min_cluster_size: int = 5,
    pairs_per_cluster: int = 1,
    min_margin: float = 0.0,
) -> pd.DataFrame:
    """Cluster the prompts of `images` and build min-max pairs by `score` (`"reactions"` or a numeric column).

    Example:
        ```python
        >>> import pandas as pd
        >>> images = pd.read_parquet("demo_output/dataset/images")  # doctest: +SKIP
        >>> pairs = make_preference_pairs(images.sample(2000, random_state=0))  # doctest: +SKIP
        ```
    """
    images = images.dropna(subset=["prompt"]).drop_duplicates("imageId").reset_index(drop=True)
    if images.empty:
        raise ValueError("No images with a prompt to pair.")
    if score == "reactions":
        images = images.assign(_score=reaction_scores(images))
    elif score in images.columns:
        images = images.assign(_score=images[score].astype("float32"))
    else:
        raise ValueError(f"score must be 'reactions' or a numeric column of the images table, got {score!r}.")
    labels = cluster_prompts(images["prompt"].tolist(), embedder, min_cluster_size=min_cluster_size)
    images = images.assign(cluster_id=labels)
    return min_max_pairs(
        images, "_score", pairs_per_cluster=pairs_per_cluster, min_margin=min_margin, score_name=score
    )


def write_preference_pairs(pairs: pd.DataFrame, dataset_dir: str | os.PathLike) -> Path:
    """Replace `<dataset_dir>/preference_pairs/train-*.parquet` with `pairs` (written to a temp file, then renamed)."""
    folder = Path(dataset_dir) / "preference_pairs"
    if not folder.parent.joinpath("README.md").is_file():
        raise FileNotFoundError(f"{dataset_dir} is not a built dataset folder (no README.md); build it first.")
    folder.mkdir(exist_ok=True)
    table = pa.Table.from_pandas(pairs[list(PREFERENCE_PAIRS_COLUMNS)], preserve_index=False)
    table = table.cast(features_for("preference_pairs").arrow_schema)
    target = folder / "train-00000-of-00001.parquet"
    tmp = folder / ".train.parquet.tmp"
    pq.write_table(table, tmp, compression="zstd")
    for old in folder.glob("train-*.parquet"):
        if old != target:
            old.unlink()
    tmp.replace(target)
    return target
