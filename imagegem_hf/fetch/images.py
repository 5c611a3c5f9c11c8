"""`imagegem dataset fetch-images`: the pixels behind the `images` config's URLs, as sharded parquet.

The output is a Hub-shaped dataset folder: `data/train-NNNNN.parquet` shards with every image-level column of the
`images` config (one row per `imageId`; join on `imageId` for the model versions) plus an `image` column
(`datasets.Image`), a README whose `configs:` lists them, per-shard failure lists under `failures/`, and
`fetch_manifest.json`. `load_dataset(OUT, split="train")` gives the images with their metadata.

Shards are cut deterministically from the (filtered, de-duplicated) `images` rows in table order, so a rerun with the
same arguments cuts the same shards: finished shards are skipped, and a shard is written (atomically, failures first)
only when every one of its URLs either succeeded or failed for a reason that retrying cannot cure (404, not an image,
undecodable, redirect loop). A shard that still has transient failures (timeouts, 5xx, a dead server) after the
retries is left unwritten and reported, so the next run fetches it again: nothing is lost and nothing is duplicated.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Features, Image, Value
from PIL import Image as PILImage
from tqdm.auto import tqdm

from imagegem_hf.fetch.client import FetchConfig, Fetcher, FetchOutcome
from imagegem_hf.fetch.storage import (
    FolderLock,
    config_dataset,
    remove_stale_temporaries,
    write_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)
from imagegem_hf.hub import refresh_dataset_info, render_card, size_category

ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
MANIFEST = "fetch_manifest.json"
ROW_GROUP_IMAGES = 64  # images per parquet row group: bounds what one lookup of `fetched_image_loader` reads


@dataclass
class ImageFetchReport:
    """Counts of one `fetch_images` run (they add up: `requested == fetched + failed + in incomplete shards`).

    Attributes:
        shards: Shards the selection is cut into.
        shards_skipped: Shards already finished by an earlier run.
        shards_written: Shards written by this run.
        shards_incomplete: Shards left for the next run (transient failures).
        requested: Images in the selection.
        fetched: Images stored (in this run's and earlier runs' shards).
        failed: Images that failed permanently, by reason in `reasons`.
        pending: Images of incomplete shards.
        requests: HTTP requests made by this run (retries included).
    """

    shards: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    shards_incomplete: int = 0
    requested: int = 0
    fetched: int = 0
    failed: int = 0
    pending: int = 0
    requests: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common()) or "none"
        text = (
            f"{self.requested:,} images in {self.shards} shards: {self.fetched:,} stored, {self.failed:,} failed "
            f"({reasons}); shards written {self.shards_written}, skipped (done earlier) {self.shards_skipped}"
        )
        if self.shards_incomplete:
            text += f"; {self.shards_incomplete} shards ({self.pending:,} images) incomplete: run again to resume"
        return text + "."


def _selection_ids(dataset: str | os.PathLike, rec_subset: str | None, pairs: bool, topic: str | None) -> set | None:
    if rec_subset is None and not pairs and topic is None:
        return None
    ids: set[int] | None = None
    if rec_subset is not None:
        table = pq.read_table(rec_subset)
        column = "itemId" if "itemId" in table.column_names else "imageId"
        if column not in table.column_names:
            raise ValueError(f"{rec_subset} has neither an itemId nor an imageId column.")
        ids = set(table.column(column).to_pylist())
    if pairs or topic is not None:
        table = config_dataset(dataset, "preference_pairs").to_table(columns=["chosen", "rejected", "topic"])
        if topic is not None:
            table = table.filter(pc.equal(table.column("topic"), topic))
        pair_ids = set(table.column("chosen").to_pylist()) | set(table.column("rejected").to_pylist())
        ids = pair_ids if ids is None else ids & pair_ids
    return ids


def iter_image_shards(
    dataset: str | os.PathLike,
    shard_size: int,
    ids: set[int] | None = None,
    limit: int | None = None,
) -> Iterator[pa.Table]:
    """The selected rows of the `images` config, one row per `imageId` (first occurrence), in shards.

    `modelVersionId` is dropped (an image made with several LoRAs has one row per LoRA in `images`).
    """
    source = config_dataset(dataset, "images")
    columns = [c for c in source.schema.names if c != "modelVersionId"]
    seen: set[int] = set()
    pending: list[pa.Table] = []
    count = 0
    for batch in source.to_batches(columns=columns, batch_size=65_536):
        keep = []
        for index, image_id in enumerate(batch.column("imageId").to_pylist()):
            if limit is not None and len(seen) >= limit:
                break
            if image_id in seen or (ids is not None and image_id not in ids):
                continue
            seen.add(image_id)
            keep.append(index)
        if keep:
            pending.append(pa.Table.from_batches([batch]).take(keep))
            count += len(keep)
        while count >= shard_size:
            table = pa.concat_tables(pending)
            yield table.slice(0, shard_size)
            pending, count = [table.slice(shard_size)], count - shard_size
        if limit is not None and len(seen) >= limit:
            break
    if count:
        yield pa.concat_tables(pending)


def _prepare(content: bytes, max_size: int | None) -> tuple[bytes, int, int]:
    """Decode fully (a truncated or corrupt image raises), optionally shrink the longest side; returns bytes, w, h."""
    with PILImage.open(io.BytesIO(content)) as image:
        image.load()
        if max_size is None or max(image.size) <= max_size:
            return content, image.width, image.height
        fmt = "JPEG" if image.format == "JPEG" else "PNG"
        image.thumbnail((max_size, max_size), PILImage.Resampling.LANCZOS)
        if fmt == "JPEG" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format=fmt, quality=95) if fmt == "JPEG" else image.save(out, format=fmt)
        return out.getvalue(), image.width, image.height


def _check_content_type(response) -> str:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and not content_type.startswith(ACCEPTED_CONTENT_TYPES):
        return f"content type {content_type}"
    return ""


async def _fetch_shard(
    fetcher: Fetcher, rows: pa.Table, max_size: int | None
) -> tuple[list[dict[str, Any] | None], list[FetchOutcome]]:
    urls = rows.column("url").to_pylist()

    async def one(url: str | None) -> tuple[dict[str, Any] | None, FetchOutcome]:
        if not url:
            return None, FetchOutcome(url="", ok=False, reason="no url")
        outcome = await fetcher.get(url, check=_check_content_type)
        if not outcome.ok:
            return None, outcome
        try:
            data, width, height = await asyncio.to_thread(_prepare, outcome.content, max_size)
        except (OSError, ValueError, PILImage.DecompressionBombError) as err:
            outcome.ok, outcome.reason = False, f"not a decodable image ({type(err).__name__})"
            return None, outcome
        finally:
            outcome.content = None
        return {"bytes": data, "path": None, "width": width, "height": height}, outcome

    results = await asyncio.gather(*(one(url) for url in urls))
    return [r[0] for r in results], [r[1] for r in results]


def _shard_table(rows: pa.Table, images: list[dict[str, Any] | None], features: Features) -> pa.Table:
    keep = [i for i, image in enumerate(images) if image is not None]
    table = rows.take(keep)
    stored = [images[i] for i in keep]
    table = table.append_column(
        "image", pa.array([{"bytes": s["bytes"], "path": None} for s in stored], features["image"].pa_type)
    )
    table = table.append_column("imageWidth", pa.array([s["width"] for s in stored], pa.int32()))
    table = table.append_column("imageHeight", pa.array([s["height"] for s in stored], pa.int32()))
    metadata = {b"huggingface": json.dumps({"info": {"features": features.to_dict()}}).encode()}
    return table.replace_schema_metadata(metadata)


def _card(output_dir: Path, shards: int) -> str:
    files = sorted((output_dir / "data").glob("train-*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return render_card("pixels_card.md", rows=rows, files=len(files), shards=shards, size_category=size_category(rows))


def fetch_images(
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config: FetchConfig | None = None,
    shard_size: int = 1000,
    max_size: int | None = None,
    rec_subset: str | None = None,
    pairs: bool = False,
    topic: str | None = None,
    limit: int | None = None,
    give_up_transient: bool = False,
    show_progress: bool = True,
) -> ImageFetchReport:
    """Download the images of a built dataset's `images` config into sharded parquet; resumable.

    Args:
        dataset: A built dataset folder or a Hub dataset repo id.
        output_dir: Output folder (created; an earlier run's folder with the same arguments is resumed).
        config: Concurrency, per-host rate, retries and timeouts.
        shard_size: Images per parquet shard.
        max_size: Shrink images whose longest side exceeds this (keeps the aspect ratio); None keeps the bytes.
        rec_subset: Only the items of a recommendation subset (`images.parquet` of `imagegem dataset subsets`).
        pairs: Only images that appear in `preference_pairs`.
        topic: Only images of `preference_pairs` with this topic ("cars", "dogs", "scenery").
        limit: At most this many images (the first in table order).
        give_up_transient: Record URLs that still time out, answer 5xx/429 or send truncated bodies after the retries
            as failures and finish their shards (a last pass); by default such shards are left for the next run.
        show_progress: Show a progress bar over images.

    Returns:
        An [`ImageFetchReport`] with the counts.

    Raises:
        ValueError: The folder holds a fetch made with other arguments (shards would not line up).

    Example:
        ```python
        >>> from imagegem_hf.fetch import FetchConfig, fetch_images
        >>> report = fetch_images("demo_output/dataset", "pixels", config=FetchConfig(concurrency=8))  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
        ```
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    output_dir = Path(output_dir)
    settings = {
        "source": str(dataset),
        "shard_size": shard_size,
        "max_size": max_size,
        "rec_subset": None if rec_subset is None else str(rec_subset),
        "pairs": pairs,
        "topic": topic,
        "limit": limit,
    }
    report = ImageFetchReport()
    with FolderLock(output_dir):
        manifest_path = output_dir / MANIFEST
        if manifest_path.exists():
            previous = json.loads(manifest_path.read_text())
            if previous.get("settings") != settings:
                raise ValueError(
                    f"{output_dir} holds a fetch made with other arguments ({previous.get('settings')}); resume it "
                    "with the same arguments or choose an empty output folder."
                )
        write_json_atomic(manifest_path, {"settings": settings})
        for sub in (output_dir / "data", output_dir / "failures"):
            sub.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(sub)
        source = Features.from_arrow_schema(config_dataset(dataset, "images").schema)
        features = Features(
            {
                **{name: feature for name, feature in source.items() if name != "modelVersionId"},
                "image": Image(),
                "imageWidth": Value("int32"),
                "imageHeight": Value("int32"),
            }
        )
        ids = _selection_ids(dataset, rec_subset, pairs, topic)
        progress = tqdm(desc="Fetching images", unit="img", disable=not show_progress)
        shards = iter_image_shards(dataset, shard_size, ids, limit)
        asyncio.run(_run(shards, output_dir, config, max_size, give_up_transient, features, report, progress))
        progress.close()
        write_atomic(output_dir / "README.md", _card(output_dir, report.shards).encode())
        refresh_dataset_info(output_dir)
        write_json_atomic(
            manifest_path, {"settings": settings, "report": {**report.__dict__, "reasons": dict(report.reasons)}}
        )
    return report


async def _run(
    shards: Iterator[pa.Table],
    output_dir: Path,
    config: FetchConfig | None,
    max_size: int | None,
    give_up_transient: bool,
    features: Features,
    report: ImageFetchReport,
    progress: tqdm,
) -> None:
    async with Fetcher(config) as fetcher:
        for index, rows in enumerate(shards):
            report.shards += 1
            report.requested += rows.num_rows
            shard = output_dir / "data" / f"train-{index:05d}.parquet"
            failures_file = output_dir / "failures" / f"train-{index:05d}.jsonl"
            if shard.exists():
                report.shards_skipped += 1
                stored = pq.ParquetFile(shard).metadata.num_rows
                report.fetched += stored
                for line in failures_file.read_text().splitlines() if failures_file.exists() else []:
                    report.failed += 1
                    report.reasons[json.loads(line)["reason"]] += 1
                progress.update(rows.num_rows)
                continue
            images, outcomes = await _fetch_shard(fetcher, rows, max_size)
            progress.update(rows.num_rows)
            if not give_up_transient and any(o.transient for o in outcomes):
                report.shards_incomplete += 1
                report.pending += rows.num_rows
                continue
            image_ids = rows.column("imageId").to_pylist()
            failures = [
                {"imageId": i, "url": o.url, "reason": o.reason, "status": o.status, "attempts": o.attempts}
                for i, o, image in zip(image_ids, outcomes, images, strict=True)
                if image is None
            ]
            write_jsonl_atomic(failures_file, failures)  # failures first: the shard file marks the shard done
            buffer = pa.BufferOutputStream()
            pq.write_table(_shard_table(rows, images, features), buffer, row_group_size=ROW_GROUP_IMAGES)
            write_atomic(shard, buffer.getvalue().to_pybytes())
            report.shards_written += 1
            report.fetched += rows.num_rows - len(failures)
            report.failed += len(failures)
            report.reasons.update(f["reason"] for f in failures)
        report.requests = fetcher.requests


def fetched_image_loader(fetch_dir: str | os.PathLike) -> Callable[[int], bytes]:
    """Map an `imageId` to its encoded image bytes in a `fetch_images` output folder.

    The `imageId` column of every shard is read once into an index; bytes are read one row group (at most
    `ROW_GROUP_IMAGES` images) at a time on demand and the last group is kept, so reading in table order reads each
    group once and memory holds the index and one group, not the pixels. Raises `FileNotFoundError` for an image
    that is not there.

    Example:
        ```python
        >>> from imagegem_hf.fetch.images import fetched_image_loader
        >>> locate = fetched_image_loader("pixels")  # doctest: +SKIP
        >>> png_or_jpeg = locate(12345)  # doctest: +SKIP
        ```
    """
    folder = Path(fetch_dir)
    shards = sorted((folder / "data").glob("train-*.parquet"))
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a `fetch-images` output folder (no {MANIFEST}).")
    index: dict[int, tuple[int, int, int]] = {}
    files = [pq.ParquetFile(shard) for shard in shards]
    for number, file in enumerate(files):
        for group in range(file.num_row_groups):
            ids = file.read_row_group(group, columns=["imageId"]).column("imageId").to_pylist()
            for row, image_id in enumerate(ids):
                index[image_id] = (number, group, row)

    last: dict[tuple[int, int], pa.ChunkedArray] = {}  # the row group read last: callers go in table order

    def locate(image_id: int) -> bytes:
        if image_id not in index:
            raise FileNotFoundError(f"imageId {image_id} is not in {folder} (not selected, or its fetch failed).")
        number, group, row = index[image_id]
        if (number, group) not in last:
            last.clear()
            last[number, group] = files[number].read_row_group(group, columns=["image"]).column("image")
        return last[number, group][row].as_py()["bytes"]

    return locate
