"""Build the ImageGem dataset (a folder laid out exactly like the Hub repo) from raw Civitai API pages.

Input: `RAW_DIR/images/` and `RAW_DIR/models/` holding responses of `GET /api/v1/images` and `GET /api/v1/models`
as `.json` (one response page), `.jsonl` (one page or one item per line) or their `.gz` versions. Files are read
in sorted order, page by page; rows go to parquet row groups as they come, so memory does not grow with the input.

Output (`OUT_DIR`):
```
images/train-00000-of-00001.parquet        loras/train-00000-of-00001.parquet
interactions/train-00000-of-00001.parquet  preference_pairs/train-00000-of-00001.parquet (empty)
README.md (card: configs YAML + Table 1)    build_stats.json    rejected.jsonl (quarantined records)
```
The card lists `preference_pairs` once `write_preference_pairs` has filled it (`datasets` cannot load a split
with no rows).
Problems with a whole file (undecodable bytes, an invalid `.json` document, no records at all) stop the build with
the file and line named; problems with one record (malformed JSONL line, missing or mistyped field, unknown enum,
duplicate id) quarantine it with a reason. The output is written to a temporary folder and renamed at the end.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from imagegem_hf.data.civitai import RecordError, flatten_image, flatten_model
from imagegem_hf.data.safety import ToxicityScorer, unsafe_mask
from imagegem_hf.data.schema import CONFIG_NAMES, features_for
from imagegem_hf.hub import atomic_directory, render_card, write_json

RAW_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
LORA_MODEL_TYPES = frozenset({"LORA", "LoCon", "DoRA"})
SHARD_NAME = "train-00000-of-00001.parquet"
# The counts of ImageGem Table 1, raw and filtered; a build writes all of them, 0 included.
TABLE1_KEYS = ("images", "unique_prompts", "loras", "tags", "users", "uploaders")


class RawInputError(ValueError):
    """A raw file that cannot be read at all (the message names the file and line)."""


@dataclass
class _SeenIds:
    """Exact membership of int64 ids in bounded, compact memory (sorted numpy array, merged chunk by chunk)."""

    sorted_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def new_mask(self, ids: np.ndarray) -> np.ndarray:
        """True for ids seen neither before nor earlier in `ids`; records them as seen.

        Membership is a binary search and recording is one sorted insert, so a chunk costs O(k log n + n)
        memory traffic with no re-hashing of the ids already seen.
        """
        position = np.searchsorted(self.sorted_ids, ids)
        seen = np.zeros(len(ids), dtype=bool)
        inside = position < len(self.sorted_ids)
        seen[inside] = self.sorted_ids[position[inside]] == ids[inside]
        _, first = np.unique(ids, return_index=True)
        mask = np.zeros(len(ids), dtype=bool)
        mask[first] = True
        mask &= ~seen
        new = np.sort(ids[mask])
        self.sorted_ids = np.insert(self.sorted_ids, np.searchsorted(self.sorted_ids, new), new)
        return mask

    def __len__(self) -> int:
        return len(self.sorted_ids)


@dataclass
class BuildReport:
    """Counts of a build (raw vs filtered, as in ImageGem Table 1) and where things were written."""

    output_dir: Path
    raw: dict[str, int]
    filtered: dict[str, int]
    rejected: dict[str, int]
    dropped: dict[str, int]

    def table1(self) -> str:
        """Table 1 of the paper for this build, as Markdown."""
        from imagegem_hf.data.stats import table1_markdown

        return table1_markdown({"raw": self.raw, "filtered": self.filtered})


@dataclass
class _BuildContext:
    """State shared by the loras and images passes of one build."""

    raw_dir: Path
    tmp: Path
    salt: str
    reject: Callable[[str, Path, int, str, Any], None]
    chunk_size: int
    show_progress: bool
    raw: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


def iter_raw_items(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, item)` for each API item in one raw file.

    A malformed JSONL line is yielded as `(line, RecordError)` so the caller can quarantine it; a file that
    cannot be decoded at all raises `RawInputError` naming the file and line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    try:
        with opener(path, "rb") as handle:
            if not is_jsonl:
                data = handle.read()
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as err:
                    line = data[: err.start].count(b"\n") + 1
                    raise RawInputError(f"{path}: line {line}: bytes that are not UTF-8 ({err.reason}).") from None
                try:
                    document = orjson.loads(data)
                except orjson.JSONDecodeError as err:
                    raise RawInputError(f"{path}: line {err.lineno}: invalid JSON ({err.msg}).") from None
                for item in _page_items(document):
                    yield 1, item
                return
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise RawInputError(f"{path}: line {number}: bytes that are not UTF-8 ({err.reason}).") from None
                try:
                    document = orjson.loads(line)
                except orjson.JSONDecodeError as err:
                    yield number, RecordError(f"malformed JSON line ({err.msg})")
                    continue
                for item in _page_items(document):
                    yield number, item
    except (OSError, EOFError, zlib.error) as err:  # unreadable file, truncated or corrupted gzip
        raise RawInputError(f"{path}: cannot be read ({type(err).__name__}: {err}).") from err


def _page_items(document: Any) -> list[Any]:
    """Items of an API response page (`{"items": [...]}`), a bare list of items, or one item."""
    if isinstance(document, dict) and "items" in document:
        items = document["items"]
        return items if isinstance(items, list) else [items]
    if isinstance(document, list):
        return document
    return [document]


def _raw_files(raw_dir: Path, kind: str) -> list[Path]:
    folder = raw_dir / kind
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(RAW_SUFFIXES))


class _ParquetSink:
    """Writes rows of one config to one parquet file in row groups, cast to the config's features."""

    def __init__(self, path: Path, config_name: str) -> None:
        self.schema = features_for(config_name).arrow_schema
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd", write_statistics=True)
        self.rows = 0

    def write(self, columns: dict[str, list]) -> None:
        table = pa.Table.from_pydict(columns, schema=self.schema)
        if table.num_rows:
            self.writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> None:
        self.writer.close()


def _columns(rows: list[dict[str, Any]], names) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in names}


def build_dataset(
    raw_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    salt: str = "",
    toxicity_scorer: ToxicityScorer | None = None,
    max_browsing_level: int | None = None,
    overwrite: bool = False,
    chunk_size: int = 20_000,
    show_progress: bool = True,
) -> BuildReport:
    """Build the four ImageGem configs from raw Civitai API pages into a Hub-shaped folder.

    Args:
        raw_dir: Folder with `images/` and `models/` sub-folders of API pages (`.json`, `.jsonl`, `.gz`).
        output_dir: The dataset folder to create (a Hub dataset repo layout).
        salt: Salt of the username hashes (`userHash = sha256(salt + username)`).
        toxicity_scorer: Prompt toxicity scorer (e.g. `DetoxifyScorer()`); images whose prompt has any unsafe
            probability > 0.2 are dropped. `None` skips the toxicity filter.
        max_browsing_level: Drop images above this Civitai browsing level (1 None, 2 Soft, 4 Mature, 8 X).
        overwrite: Replace an existing `output_dir` written by an earlier build (any other non-empty folder is
            refused; see `imagegem_hf.hub.atomic_directory`).
        chunk_size: Records per parquet row group (bounds memory).
        show_progress: Show a progress bar per raw file kind.

    Returns:
        A `BuildReport` with raw / filtered / rejected counts.

    Raises:
        RawInputError: A raw file cannot be decoded, or there are no image records at all.
        FileExistsError: `output_dir` is not empty and `overwrite` is False, or it was not written by a build.
        ValueError: `output_dir` is, contains or lies inside `raw_dir`.

    Example:
        ```python
        >>> from imagegem_hf.data.build import build_dataset
        >>> report = build_dataset("demo_output/raw", "demo_output/dataset", overwrite=True)  # doctest: +SKIP
        >>> print(report.table1())  # doctest: +SKIP
        ```
    """
    raw_dir, output_dir = Path(raw_dir), Path(output_dir)
    image_files, model_files = _raw_files(raw_dir, "images"), _raw_files(raw_dir, "models")
    if not image_files:
        raise RawInputError(f"No raw image pages under {raw_dir / 'images'} (expected {', '.join(RAW_SUFFIXES)}).")
    rejected: Counter[str] = Counter()
    with atomic_directory(output_dir, overwrite=overwrite, inputs=[raw_dir]) as tmp:
        with open(tmp / "rejected.jsonl", "wb") as quarantine:

            def reject(kind: str, path: Path, line: int, reason: str, item: Any) -> None:
                rejected[kind] += 1
                record = {"kind": kind, "file": path.relative_to(raw_dir).as_posix(), "line": line, "reason": reason}
                record["record"] = item if not isinstance(item, RecordError) else None
                quarantine.write(orjson.dumps(record, option=orjson.OPT_SORT_KEYS) + b"\n")

            context = _BuildContext(raw_dir, tmp, salt, reject, chunk_size, show_progress)
            _build_loras(context, model_files)
            _build_images(context, image_files, toxicity_scorer, max_browsing_level)
            raw = {key: context.raw[key] for key in TABLE1_KEYS}
            filtered = {key: context.filtered[key] for key in TABLE1_KEYS}
            dropped = context.dropped
        empty = _ParquetSink(tmp / "preference_pairs" / SHARD_NAME, "preference_pairs")
        empty.close()
        report = BuildReport(output_dir, raw, filtered, dict(rejected), dict(dropped))
        write_json(
            tmp / "build_stats.json",
            {"raw": report.raw, "filtered": report.filtered, "rejected": report.rejected, "dropped": report.dropped},
        )
        (tmp / "README.md").write_text(
            render_card(
                "dataset_card.md",
                configs=[name for name in CONFIG_NAMES if name != "preference_pairs"],  # listed once filled
                shard_pattern="train-*.parquet",
                report=report,
                salted=bool(salt),
                toxicity=toxicity_scorer is not None,
                max_browsing_level=max_browsing_level,
            ),
            encoding="utf-8",
        )
    return report


def _flattened(
    context: _BuildContext, files: list[Path], kind: str, flatten: Callable[..., list[dict[str, Any]]]
) -> Iterator[tuple[Path, int, Any, list[dict[str, Any]]]]:
    """`(path, line, item, rows)` for every record that flattens; the others are quarantined with their reason."""
    for path in tqdm(files, desc=f"{kind}s", unit="file", disable=not context.show_progress):
        for line, item in iter_raw_items(path):
            if isinstance(item, RecordError):
                context.reject(kind, path, line, item.reason, item)
                continue
            try:
                rows = flatten(item, salt=context.salt)
            except RecordError as err:
                context.reject(kind, path, line, err.reason, item)
                continue
            yield path, line, item, rows


def _build_loras(context: _BuildContext, files: list[Path]) -> None:
    from imagegem_hf.data.schema import LORAS_COLUMNS

    tmp, reject = context.tmp, context.reject
    filtered, dropped, chunk_size = context.filtered, context.dropped, context.chunk_size

    sink = _ParquetSink(tmp / "loras" / SHARD_NAME, "loras")
    seen_models: set[int] = set()
    raw_tags: set[str] = set()
    kept_tags: set[str] = set()
    uploaders_raw: set[str] = set()
    uploaders_kept: set[str] = set()
    buffer: list[dict[str, Any]] = []
    raw_versions = 0
    for path, line, item, rows in _flattened(context, files, "model", flatten_model):
        if rows[0]["modelId"] in seen_models:
            reject("model", path, line, f"duplicate modelId {rows[0]['modelId']}", item)
            continue
        seen_models.add(rows[0]["modelId"])
        tags = {t for t in (rows[0]["tags"] or "").split(", ") if t}
        raw_versions += len({r["modelVersionId"] for r in rows})
        raw_tags |= tags
        uploaders_raw.add(rows[0]["userHash"])
        if rows[0]["modelType"] not in LORA_MODEL_TYPES:
            dropped["not_a_lora"] += 1
            continue
        filtered["loras"] += len({r["modelVersionId"] for r in rows})
        kept_tags |= tags
        uploaders_kept.add(rows[0]["userHash"])
        buffer.extend(rows)
        if len(buffer) >= chunk_size:
            sink.write(_columns(buffer, LORAS_COLUMNS))
            buffer.clear()
    sink.write(_columns(buffer, LORAS_COLUMNS))
    sink.close()
    filtered["tags"], filtered["uploaders"] = len(kept_tags), len(uploaders_kept)
    context.raw.update({"loras": raw_versions, "tags": len(raw_tags), "uploaders": len(uploaders_raw)})


def _build_images(
    context: _BuildContext,
    files: list[Path],
    toxicity_scorer: ToxicityScorer | None,
    max_browsing_level: int | None,
) -> None:
    from imagegem_hf.data.schema import IMAGES_COLUMNS, INTERACTIONS_COLUMNS

    raw_dir, tmp, reject = context.raw_dir, context.tmp, context.reject
    raw, filtered, dropped, chunk_size = context.raw, context.filtered, context.dropped, context.chunk_size

    images_sink = _ParquetSink(tmp / "images" / SHARD_NAME, "images")
    interactions_sink = _ParquetSink(tmp / "interactions" / SHARD_NAME, "interactions")
    seen_images = _SeenIds()
    raw_prompts, kept_prompts = _SeenIds(), _SeenIds()
    raw_users: set[str] = set()
    kept_users: set[str] = set()
    pending: list[tuple[Path, int, Any, list[dict[str, Any]]]] = []

    def flush() -> None:
        if not pending:
            return
        ids = np.array([rows[0]["imageId"] for _, _, _, rows in pending], dtype=np.int64)
        new = seen_images.new_mask(ids)
        records = []
        for (path, line, item, rows), is_new in zip(pending, new, strict=True):
            if is_new:
                records.append(rows)
            else:
                reject("image", path, line, f"duplicate imageId {rows[0]['imageId']}", item)
        pending.clear()
        prompts = [rows[0]["prompt"] for rows in records]
        raw["images"] += len(records)
        raw_prompts.new_mask(_prompt_keys(prompts))
        raw_users.update(rows[0]["userHash"] for rows in records)
        keep = np.ones(len(records), dtype=bool)
        if max_browsing_level is not None:
            levels = np.array([rows[0]["browsingLevel"] or 0 for rows in records])
            too_high = levels > max_browsing_level
            dropped["browsing_level"] += int(too_high.sum())
            keep &= ~too_high
        if toxicity_scorer is not None:
            toxic = unsafe_mask(toxicity_scorer, prompts) & keep
            dropped["toxic_prompt"] += int(toxic.sum())
            keep &= ~toxic
        kept = [rows for rows, k in zip(records, keep, strict=True) if k]
        filtered["images"] += len(kept)
        kept_prompts.new_mask(_prompt_keys([rows[0]["prompt"] for rows in kept]))
        kept_users.update(rows[0]["userHash"] for rows in kept)
        image_rows = [row for rows in kept for row in rows]
        images_sink.write(_columns(image_rows, IMAGES_COLUMNS))
        interactions = []
        for rows in kept:
            first = rows[0]
            interactions.append(
                {
                    "userHash": first["userHash"],
                    "itemType": "image",
                    "itemId": first["imageId"],
                    "timestamp": first["createdAt"],
                    "source": "uploaded",
                    "weight": 1.0,
                }
            )
            interactions.extend(
                {
                    "userHash": row["userHash"],
                    "itemType": "model",
                    "itemId": row["modelVersionId"],
                    "timestamp": row["createdAt"],
                    "source": "generated",
                    "weight": 1.0,
                }
                for row in rows
                if row["modelVersionId"] is not None
            )
        interactions_sink.write(_columns(interactions, INTERACTIONS_COLUMNS))

    for path, line, item, rows in _flattened(context, files, "image", flatten_image):
        pending.append((path, line, item, rows))
        if len(pending) >= chunk_size:
            flush()
    flush()
    images_sink.close()
    interactions_sink.close()
    if raw["images"] == 0:
        raise RawInputError(f"No valid image records under {raw_dir / 'images'}; see the reasons in rejected.jsonl.")
    raw["unique_prompts"], filtered["unique_prompts"] = len(raw_prompts), len(kept_prompts)
    raw["users"], filtered["users"] = len(raw_users), len(kept_users)


def _prompt_keys(prompts: list[str | None]) -> np.ndarray:
    """64-bit keys of non-empty prompts for distinct counting (blake2b, stable across runs)."""
    import hashlib

    return np.array(
        [
            int.from_bytes(hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
            for p in prompts
            if p
        ],
        dtype=np.int64,
    )
