"""Image-embedding item features for image recommendation (ImageGem Table 5 initialises the Two-Tower's item
embeddings from a pre-trained image encoder): an embedding column of the `images` config, or CLIP embeddings of
the stored pixels, computed in batches and cached as parquet next to the dataset (resumable)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from imagegem_hf.distributed import is_main_process, wait_for_everyone
from imagegem_hf.embeddings import ImageEmbedder

#: Images embedded per cache part: a killed run loses at most this many embeddings.
CACHE_PART_SIZE = 1024


def embedding_column_features(dataset_dir: str | os.PathLike, column: str) -> pd.DataFrame:
    """Item features from a vector column of the `images` config (one row per imageId, one column per dimension).

    Args:
        dataset_dir: A built ImageGem dataset folder.
        column: Name of a list/array column holding one embedding per image.

    Returns:
        A DataFrame indexed by `imageId`.

    Raises:
        ValueError: The column is missing, or its vectors are null or of unequal lengths.
    """
    images_dir = Path(dataset_dir) / "images"
    available = pq.ParquetDataset(images_dir).schema.names
    if column not in available:
        raise ValueError(f"{images_dir} has no column {column!r}; available: {available}.")
    table = pd.read_parquet(images_dir, columns=["imageId", column]).drop_duplicates("imageId")
    lengths = table[column].map(lambda v: -1 if v is None else len(v))
    if (lengths < 0).any() or lengths.nunique() != 1:
        bad = table["imageId"][(lengths < 0) | (lengths != lengths.max())].head(3).tolist()
        raise ValueError(
            f"Column {column!r} of {images_dir} needs one vector of the same length per image; e.g. imageId {bad} "
            "have none or another length."
        )
    return pd.DataFrame(np.stack(table[column].to_numpy()).astype(np.float32), index=table["imageId"].to_numpy())


def pixel_dir(dataset_dir: str | os.PathLike, pixels_dir: str | os.PathLike | None = None) -> Path:
    """The parquet folder holding the pixels: `<pixels_dir>/data` of an `imagegem dataset fetch-images` output
    when given, else the dataset's own `images` config."""
    return Path(pixels_dir) / "data" if pixels_dir is not None else Path(dataset_dir) / "images"


def has_pixels(dataset_dir: str | os.PathLike, pixels_dir: str | os.PathLike | None = None) -> bool:
    """Whether there are stored pixels: an `image` column in the `images` config (built with images) or in the
    `fetch-images` output `pixels_dir`."""
    images_dir = pixel_dir(dataset_dir, pixels_dir)
    return images_dir.is_dir() and "image" in pq.ParquetDataset(images_dir).schema.names


def default_cache_dir(dataset_dir: str | os.PathLike, model_name: str) -> Path:
    """`<dataset_dir>.image_embeddings/<model name>/`: next to the dataset, one folder per embedding model."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", str(model_name)).strip("-") or "model"
    dataset_dir = Path(dataset_dir)
    return dataset_dir.parent / f"{dataset_dir.name}.image_embeddings" / slug


def clip_image_features(
    dataset_dir: str | os.PathLike,
    image_ids: np.ndarray,
    embedder: ImageEmbedder,
    cache_dir: str | os.PathLike,
    read_batch_size: int = 256,
    pixels_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Embeddings of the stored pixels of `image_ids`, cached in `cache_dir` as parquet parts (resumable).

    Images already in the cache are not embedded again, so an interrupted run resumes where it stopped, and a
    later run with more images embeds only the new ones. The cache must belong to one embedding model (see
    `default_cache_dir`). Under `accelerate launch` (or `torchrun`) every process reads the same images, the
    embedder splits each part's batches across processes, and the main process alone writes the parts.

    Args:
        dataset_dir: A built ImageGem dataset folder whose `images` config has an `image` column.
        image_ids: The images to embed (e.g. `InteractionData.item_ids` of image interactions).
        embedder: Any `ImageEmbedder`, e.g. `imagegem_hf.embeddings.CLIPEmbedder` (it batches internally).
        cache_dir: Folder of `part-*.parquet` files with columns `imageId, embedding`.
        read_batch_size: Parquet rows read at a time (bounds the memory of decoded images).
        pixels_dir: An `imagegem dataset fetch-images` output folder to read the pixels from instead.

    Returns:
        A DataFrame indexed by `imageId`, one column per embedding dimension.

    Raises:
        ValueError: The dataset stores no pixels, or some of `image_ids` have none.

    Example:
        ```python
        >>> from imagegem_hf.embeddings import CLIPEmbedder
        >>> embedder = CLIPEmbedder.from_pretrained("openai/clip-vit-large-patch14")  # doctest: +SKIP
        >>> features = clip_image_features(  # doctest: +SKIP
        ...     "proj/dataset", data.item_ids, embedder, default_cache_dir("proj/dataset", "clip-vit-large-patch14")
        ... )
        ```
    """
    images_dir = pixel_dir(dataset_dir, pixels_dir)
    if not has_pixels(dataset_dir, pixels_dir):
        raise ValueError(
            f"{images_dir} stores no pixels (no 'image' column): fetch them (`imagegem dataset fetch-images`, then "
            "--pixels DIR), or pass an embedding column (--image-embedding-column)."
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = _read_cache(cache_dir)
    wait_for_everyone()  # every process has read the same cache before the main process adds to it
    wanted = pd.Index(pd.unique(np.asarray(image_ids)))
    todo = set(wanted.difference(cached.index).tolist())
    if todo:
        parts = len(list(cache_dir.glob("part-*.parquet")))
        pending_ids: list = []
        pending_images: list[Image.Image] = []
        progress = tqdm(total=len(todo), desc="image embeddings", unit="img")
        for batch in ds.dataset(images_dir, format="parquet").to_batches(
            columns=["imageId", "image"], batch_size=read_batch_size
        ):
            for image_id, image in zip(batch["imageId"].to_pylist(), batch["image"].to_pylist(), strict=True):
                if image_id not in todo or image is None:
                    continue
                todo.discard(image_id)
                pending_ids.append(image_id)
                pending_images.append(_decode(image, images_dir, image_id))
                if len(pending_ids) == CACHE_PART_SIZE:
                    _write_part(cache_dir, parts, pending_ids, embedder.embed_images(pending_images))
                    parts, pending_ids, pending_images = parts + 1, [], []
                    progress.update(CACHE_PART_SIZE)
        if pending_ids:
            _write_part(cache_dir, parts, pending_ids, embedder.embed_images(pending_images))
            progress.update(len(pending_ids))
        progress.close()
        wait_for_everyone()  # the main process has written every part
        cached = _read_cache(cache_dir)
    missing = wanted.difference(cached.index)
    if len(missing):
        raise ValueError(
            f"{len(missing)} of {len(wanted)} images have no pixels in {images_dir}, e.g. imageId "
            f"{missing[:3].tolist()}; drop their interactions or pass an embedding column."
        )
    return cached.loc[wanted]


def _read_cache(cache_dir: Path) -> pd.DataFrame:
    parts = sorted(cache_dir.glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame()
    table = pd.concat([pd.read_parquet(p) for p in parts]).drop_duplicates("imageId", keep="last")
    return pd.DataFrame(np.stack(table["embedding"].to_numpy()).astype(np.float32), index=table["imageId"].to_numpy())


def _write_part(cache_dir: Path, index: int, ids: list, vectors: np.ndarray) -> None:
    """Write one part atomically (a killed run leaves no half-written part); only the main process writes."""
    if not is_main_process():
        return
    path = cache_dir / f"part-{index:05d}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pd.DataFrame({"imageId": ids, "embedding": list(vectors.astype(np.float32))}).to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _decode(value: dict, images_dir: Path, image_id) -> Image.Image:
    """A `datasets.Image` cell (`{"bytes": ..., "path": ...}`) as a PIL image."""
    try:
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        return Image.open(value["path"]).convert("RGB")
    except (OSError, TypeError, ValueError) as err:
        raise ValueError(f"imageId {image_id} in {images_dir}: the stored image cannot be decoded ({err}).") from err


def image_item_features(
    dataset_dir: str | os.PathLike,
    image_ids: np.ndarray,
    embedding_column: str | None = None,
    clip_model: str | os.PathLike = "openai/clip-vit-large-patch14",
    batch_size: int = 64,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    pixels_dir: str | os.PathLike | None = None,
) -> pd.DataFrame | None:
    """Item features for image recommendation: `embedding_column` when given, else CLIP embeddings of the stored
    pixels (cached, see `clip_image_features`), else `None` (the dataset has neither).

    Args:
        dataset_dir: A built ImageGem dataset folder.
        image_ids: The images that need a vector.
        embedding_column: A vector column of the `images` config.
        clip_model: CLIP path or repo id used when there is no column and the dataset stores pixels.
        batch_size: CLIP batch size.
        device: CLIP device.
        cache_dir: Embedding cache; `None` is `default_cache_dir(dataset_dir, clip_model)`.
        pixels_dir: An `imagegem dataset fetch-images` output folder holding the pixels.

    Returns:
        A DataFrame indexed by imageId (one column per dimension), or `None`.

    Example:
        ```python
        >>> features = image_item_features("proj/dataset", data.item_ids)  # doctest: +SKIP
        >>> TwoTower(item_features=features).fit(train, validation=val)  # doctest: +SKIP
        ```
    """
    if embedding_column is not None:
        return embedding_column_features(dataset_dir, embedding_column)
    if not has_pixels(dataset_dir, pixels_dir):
        return None
    from imagegem_hf.embeddings import CLIPEmbedder

    embedder = CLIPEmbedder.from_pretrained(clip_model, device=device, batch_size=batch_size)
    cache_dir = cache_dir or default_cache_dir(dataset_dir, str(clip_model))
    return clip_image_features(dataset_dir, image_ids, embedder, cache_dir, pixels_dir=pixels_dir)
