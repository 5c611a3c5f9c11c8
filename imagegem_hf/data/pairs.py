"""Preference pairs from the `images` config (ImageGem §4.1): cluster prompts, then pair winners and losers.

Prompts are embedded (any `TextEmbedder`; default the offline all-MiniLM-L6-v2), L2-normalised, reduced with PCA
and clustered with HDBSCAN (`sklearn.cluster.HDBSCAN`). Within each cluster, images are ranked by a score and
paired min-max: the best with the worst, the second best with the second worst, and so on, while the margin
exceeds `min_margin`. The score is any numeric column (e.g. a precomputed HPSv2 score) or `"reactions"`, the
implicit-feedback score of `reaction_scores`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imagegem_hf.data.schema import CONFIG_NAMES, PREFERENCE_PAIRS_COLUMNS, features_for
from imagegem_hf.embeddings import TextEmbedder, l2_normalize
from imagegem_hf.hub import refresh_dataset_info
from imagegem_hf.scoring.base import Scorer

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
    pca_components: int | None = 16,
    min_cluster_size: int = 5,
    partition_size: int = 10_000,
    seed: int = 0,
    show_progress: bool = False,
) -> np.ndarray:
    """HDBSCAN cluster label per prompt (−1 = noise), scalable to millions of prompts.

    Embeddings are L2-normalised and reduced with randomized PCA. Up to `partition_size` prompts are clustered
    with one HDBSCAN (`sklearn.cluster.HDBSCAN`), whose cost grows about quadratically with the number of points.
    Beyond that, the prompts are first split into coarse k-means partitions of at most `partition_size` points
    (mini-batch k-means, recursively for oversized parts) and HDBSCAN runs in each: prompt clusters are small
    and local (a few to a few hundred prompts), so the partitions only cut the rare cluster that straddles a
    boundary, and the cost becomes linear in the number of prompts.

    Args:
        prompts: The prompts (ignored when `embeddings` is given).
        embedder: Text embedder; default `SentenceTransformerEmbedder()` (offline all-MiniLM-L6-v2).
        embeddings: Precomputed embeddings, one row per prompt.
        pca_components: Reduce to this many PCA components before clustering (`None` keeps all).
        min_cluster_size: HDBSCAN's minimum cluster size.
        partition_size: Largest number of prompts clustered by one HDBSCAN.
        seed: Seed of the randomized PCA and of the k-means partitions.
        show_progress: Show a progress bar over partitions.

    Returns:
        `int32` labels; clusters are numbered consecutively across partitions.

    Example:
        ```python
        >>> labels = cluster_prompts(["a red car", "a blue car", "a dog"] * 5, min_cluster_size=3)  # doctest: +SKIP
        ```
    """
    from sklearn.decomposition import PCA
    from tqdm.auto import tqdm

    if embeddings is None:
        if embedder is None:
            from imagegem_hf.embeddings import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder()
        embeddings = embedder.embed_texts(prompts)
    if partition_size < 2 * min_cluster_size:
        raise ValueError(f"partition_size ({partition_size}) must be at least 2 × min_cluster_size.")
    x = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    if pca_components is not None and x.shape[1] > pca_components and len(x) > pca_components:
        x = PCA(pca_components, svd_solver="randomized", random_state=seed).fit_transform(x).astype(np.float32)
    labels = np.full(len(x), -1, dtype=np.int32)
    parts = _partitions(x, np.arange(len(x)), partition_size, seed)
    next_label = 0
    for part in tqdm(parts, desc="Clustering prompts", disable=not show_progress or len(parts) == 1):
        part_labels = _hdbscan(x[part], min_cluster_size)
        found = part_labels >= 0
        labels[part[found]] = part_labels[found] + next_label
        next_label += int(part_labels.max()) + 1 if found.any() else 0
    return labels


def _hdbscan(x: np.ndarray, min_cluster_size: int) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    if len(x) < min_cluster_size:
        return np.full(len(x), -1, dtype=np.int32)
    return HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(x).astype(np.int32)


def _partitions(x: np.ndarray, index: np.ndarray, partition_size: int, seed: int) -> list[np.ndarray]:
    """Split `index` (rows of `x`) into k-means parts of at most `partition_size` rows."""
    from sklearn.cluster import MiniBatchKMeans

    if len(index) <= partition_size:
        return [index]
    k = int(np.ceil(2 * len(index) / partition_size))
    kmeans = MiniBatchKMeans(k, random_state=seed, batch_size=4096, n_init=1, max_iter=20)
    assignment = kmeans.fit_predict(x[index])
    if np.bincount(assignment).max() == len(index):  # degenerate (identical points): split by position
        return [index[i : i + partition_size] for i in range(0, len(index), partition_size)]
    parts = []
    for part in range(k):
        members = index[assignment == part]
        if len(members):
            parts += _partitions(x, members, partition_size, seed + 1)
    return parts


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
    valid = images[images[cluster_col] >= 0].drop_duplicates("imageId")
    valid = valid.sort_values([cluster_col, score_col, "imageId"], kind="stable")
    group = valid.groupby(cluster_col, sort=False)
    position = group.cumcount().to_numpy()
    size = group[score_col].transform("size").to_numpy()
    # The k-th worst sits at position k, the k-th best at size − 1 − k (k < size // 2).
    k_worst = position
    k_best = size - 1 - position
    worst = valid[(k_worst < np.minimum(pairs_per_cluster, size // 2))]
    best = valid[(k_best < np.minimum(pairs_per_cluster, size // 2))].iloc[::-1]
    best = best.sort_values([cluster_col], kind="stable")
    # Both frames are now ordered by (cluster, k): the best's rank from the top equals the worst's from the bottom.
    chosen_score = best[score_col].to_numpy(dtype=np.float64)
    rejected_score = worst[score_col].to_numpy(dtype=np.float64)
    # Margins shrink with k, so "stop at the first margin ≤ min_margin" is a filter.
    keep = chosen_score - rejected_score > min_margin
    prompts = best["prompt"].fillna("").to_numpy()[keep]
    pairs = pd.DataFrame(
        {
            "prompt": prompts,
            "chosen": best["imageId"].to_numpy(dtype=np.int64)[keep],
            "rejected": worst["imageId"].to_numpy(dtype=np.int64)[keep],
            "chosen_score": chosen_score[keep].astype(np.float32),
            "rejected_score": rejected_score[keep].astype(np.float32),
            "score_name": score_name or score_col,
            "cluster_id": best[cluster_col].to_numpy(dtype=np.int32)[keep],
            "topic": [topic_of(p) for p in prompts],
        }
    )
    return pairs[list(PREFERENCE_PAIRS_COLUMNS)].reset_index(drop=True)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# Maps an imageId to its image: a file (`image_dir_loader`) or its encoded bytes (`fetched_image_loader`).
ImageLocator = Callable[[int], Path | bytes]


def _image_bytes(image: Path | bytes) -> bytes:
    return image.read_bytes() if isinstance(image, Path) else bytes(image)


def image_dir_loader(image_dir: str | os.PathLike) -> Callable[[int], Path]:
    """Map an `imageId` to its file in `image_dir` (`<imageId>.jpg|.jpeg|.png|.webp`, e.g. downloaded from the
    `url` column); raises `FileNotFoundError` for a missing image."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist.")

    def locate(image_id: int) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = folder / f"{image_id}{suffix}"
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"No image file for imageId {image_id} in {folder} (tried {', '.join(IMAGE_SUFFIXES)})."
        )

    return locate


def scorer_scores(
    images: pd.DataFrame,
    scorer: Scorer,
    locate: ImageLocator,
    batch_size: int = 32,
) -> tuple[pd.Series, dict[str, int]]:
    """Score each (image, prompt) of `images` with a reward model (HPSv2, PickScore, CLIP score, …).

    Images that are missing or unreadable get NaN and are counted, never silently scored. Under `accelerate launch`
    (or `torchrun`) each process scores every `num_processes`-th batch and every process gets all the scores back in
    input order: the same numbers as one process, as the batches are the same.

    Returns:
        `(scores, problems)`: a float32 Series aligned with `images` and `{"missing image": n, "unreadable image": m}`.

    Example:
        ```python
        >>> from imagegem_hf.scoring import HPSv2
        >>> hps = HPSv2.from_pretrained("xswu/HPSv2")  # doctest: +SKIP
        >>> scores, problems = scorer_scores(images, hps, image_dir_loader("pixels/"))  # doctest: +SKIP
        ```
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from imagegem_hf.distributed import gather_batches, my_batches

    scores = np.full(len(images), np.nan, dtype=np.float32)
    ids, prompts = images["imageId"].tolist(), images["prompt"].fillna("").tolist()
    batches = [range(start, min(start + batch_size, len(ids))) for start in range(0, len(ids), batch_size)]
    local = []  # (batch number, (rows, scores, problems)); under `accelerate launch` each process scores its share
    for number, batch in tqdm(my_batches(batches), desc=f"Scoring with {type(scorer).__name__}"):
        batch_images, rows = [], []
        problems = {"missing image": 0, "unreadable image": 0}
        for row in batch:
            try:
                path = locate(ids[row])
            except FileNotFoundError:
                problems["missing image"] += 1
                continue
            try:
                with Image.open(path if isinstance(path, Path) else io.BytesIO(path)) as image:
                    batch_images.append(image.convert("RGB"))
            except OSError:
                problems["unreadable image"] += 1
                continue
            rows.append(row)
        values = scorer.score(batch_images, [prompts[r] for r in rows], batch_size=batch_size) if rows else None
        local.append((number, (rows, None if values is None else values.numpy(), problems)))
    totals = {"missing image": 0, "unreadable image": 0}
    for rows, values, problems in gather_batches(local):
        if rows:
            scores[rows] = values
        for key, count in problems.items():
            totals[key] += count
    return pd.Series(scores, index=images.index), {k: v for k, v in totals.items() if v}


def make_preference_pairs(
    images: pd.DataFrame,
    *,
    score: str = "reactions",
    scorer: Scorer | None = None,
    locate: ImageLocator | None = None,
    embedder: TextEmbedder | None = None,
    min_cluster_size: int = 5,
    pairs_per_cluster: int = 1,
    min_margin: float = 0.0,
) -> pd.DataFrame:
    """Cluster the prompts of `images` and build min-max pairs by a score.

    Scores, in the order they are looked for:
    - a reward model (`scorer`, e.g. HPSv2 as in the paper) applied to the image files found by `locate`
      (images without a file are left out and counted in `pairs.attrs["problems"]`);
    - `score="reactions"`: implicit feedback, `reaction_scores` (likes + hearts over the uploader's typical
      engagement); use `min_margin` to demand a clear difference (e.g. 1.0 = one "typical image" of reactions);
    - `score=<column>`: any precomputed numeric column of the images table.

    Example:
        ```python
        >>> import pandas as pd
        >>> images = pd.read_parquet("demo_output/dataset/images")  # doctest: +SKIP
        >>> pairs = make_preference_pairs(images.sample(2000, random_state=0))  # doctest: +SKIP
        ```
    """
    images = images.dropna(subset=["prompt"]).drop_duplicates("imageId").reset_index(drop=True)
    images = images[images["prompt"].str.strip() != ""].reset_index(drop=True)
    if images.empty:
        raise ValueError("No images with a prompt to pair.")
    problems: dict[str, int] = {}
    if scorer is not None:
        if locate is None:
            raise ValueError("Scoring with a reward model needs the image files: pass locate=image_dir_loader(dir).")
        values, problems = scorer_scores(images, scorer, locate)
        images = images.assign(_score=values).dropna(subset=["_score"]).reset_index(drop=True)
        score = type(scorer).__name__.lower()
    elif score == "reactions":
        images = images.assign(_score=reaction_scores(images))
    elif score in images.columns:
        images = images.assign(_score=images[score].astype("float32"))
    else:
        raise ValueError(f"score must be 'reactions' or a numeric column of the images table, got {score!r}.")
    if images.empty:
        raise ValueError(f"No image could be scored ({problems}).")
    labels = cluster_prompts(
        images["prompt"].tolist(), embedder, min_cluster_size=min_cluster_size, show_progress=True
    )
    images = images.assign(cluster_id=labels)
    pairs = min_max_pairs(
        images, "_score", pairs_per_cluster=pairs_per_cluster, min_margin=min_margin, score_name=score
    )
    pairs.attrs["problems"] = problems
    return pairs


def exchange_format(pairs: pd.DataFrame, locate: ImageLocator, seed: int = 0):
    """The pairs in the de-facto Diffusion-DPO exchange format of Pick-a-Pic: `jpg_0`, `jpg_1` (encoded image
    bytes), `label_0` (1.0 when `jpg_0` is preferred) and `caption`.

    The winner's side is drawn at random (seeded) so that no position bias is baked into the data.

    Returns:
        A `datasets.Dataset`, ready for `DiffusionDPOTrainer` or any Pick-a-Pic-style trainer.

    Example:
        ```python
        >>> ds = exchange_format(pairs, image_dir_loader("pixels/"))  # doctest: +SKIP
        >>> ds.push_to_hub("org/imagegem-dpo-pairs")  # doctest: +SKIP
        ```
    """
    from datasets import Dataset, Features, Value

    rng = np.random.default_rng(seed)
    first_wins = rng.random(len(pairs)) < 0.5
    columns: dict[str, list] = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    for wins, (_, pair) in zip(first_wins, pairs.iterrows(), strict=True):
        chosen, rejected = (_image_bytes(locate(int(pair[side]))) for side in ("chosen", "rejected"))
        columns["jpg_0"].append(chosen if wins else rejected)
        columns["jpg_1"].append(rejected if wins else chosen)
        columns["label_0"].append(1.0 if wins else 0.0)
        columns["caption"].append(pair["prompt"])
    features = Features(
        {"jpg_0": Value("binary"), "jpg_1": Value("binary"), "label_0": Value("float32"), "caption": Value("string")}
    )
    return Dataset.from_dict(columns, features=features)


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
    list_config_in_card(Path(dataset_dir), "preference_pairs", listed=table.num_rows > 0)
    return target


def list_config_in_card(dataset_dir: Path, config_name: str, listed: bool) -> None:
    """Add `config_name` to the `configs:` of the dataset card (or remove it), keeping the order of `CONFIG_NAMES`.

    `datasets` cannot load a split with no rows ("Instruction 'train' corresponds to no data", huggingface/datasets
    PR #8401), so a config is listed only while it has rows: `load_dataset(dir, name)` works for every listed one.
    """
    from huggingface_hub.repocard import metadata_load, metadata_save

    card = dataset_dir / "README.md"
    metadata = metadata_load(card) or {}
    configs = [c for c in metadata.get("configs", []) if c.get("config_name") != config_name]
    if listed:
        path = f"{config_name}/train-*.parquet"
        configs.append({"config_name": config_name, "data_files": [{"split": "train", "path": path}]})
    order = {name: i for i, name in enumerate(CONFIG_NAMES)}
    metadata["configs"] = sorted(configs, key=lambda c: order.get(c["config_name"], len(order)))
    metadata_save(card, metadata)
    refresh_dataset_info(dataset_dir)


def write_exchange_pairs(
    pairs: pd.DataFrame, locate: ImageLocator, output_dir: str | os.PathLike, seed: int = 0
) -> Path:
    """Write `exchange_format(pairs, locate, seed)` to `<output_dir>/train-00000-of-00001.parquet` (temp file, then
    rename) and return the file."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "train-00000-of-00001.parquet"
    tmp = folder / ".train.parquet.tmp"
    exchange_format(pairs, locate, seed=seed).to_parquet(str(tmp))
    tmp.replace(target)
    return target
