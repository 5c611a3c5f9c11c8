"""Build the ImageGem dataset (a folder laid out exactly like the Hub repo) from raw Civitai API pages.

Input: `RAW_DIR/images/` and `RAW_DIR/models/` holding responses of `GET /api/v1/images` and `GET /api/v1/models`
as `.json` (one response page), `.jsonl` (one page or one item per line) or their `.gz` versions. Files are read
in sorted order, page by page (item by item for pages over `STREAM_BYTES`); rows go to parquet row groups as they
come, so memory does not grow with the input. Unreadable folders, link loops, FIFOs and dangling links are skipped
with one warning of counts.

Output (`OUT_DIR`):
```
images/train-00000-of-00001.parquet        loras/train-00000-of-00001.parquet
interactions/train-00000-of-00001.parquet  preference_pairs/train-00000-of-00001.parquet (empty)
README.md (card: configs YAML + Table 1)    build_stats.json    rejected.jsonl (quarantined records)
```
The card lists `preference_pairs` once `write_preference_pairs` has filled it (`datasets` cannot load a split
with no rows).
Problems with a whole file (undecodable bytes, an invalid `.json` document, no records at all) stop the build with
the file, line and column named; problems with one record (malformed JSONL line, missing or mistyped field, a value
its column's type cannot hold, unknown enum, duplicate id) quarantine it with a reason. Of duplicates, the record
survives, not the file: the newest `createdAt` (images) or `publishedAt` (models), then the smallest id, then the
smallest digest of the record's JSON. The output is written with `imagegem_hf.hub.atomic_directory`: a temporary
folder renamed at the end, never inside the input, replacing only an earlier build.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import logging
import os
import stat
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ijson
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from imagegem_hf.data.civitai import RecordError, flatten_image, flatten_model
from imagegem_hf.data.safety import ToxicityScorer, unsafe_mask
from imagegem_hf.data.schema import CONFIG_NAMES, features_for
from imagegem_hf.hub import atomic_directory, refresh_dataset_info, render_card, size_category, write_json

RAW_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
STREAM_BYTES = 16 * 2**20  # a page or JSONL line larger than this is parsed item by item
LORA_MODEL_TYPES = frozenset({"LORA", "LoCon", "DoRA"})
SHARD_NAME = "train-00000-of-00001.parquet"
logger = logging.getLogger(__name__)
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
    cannot be decoded at all, or holds no record, raises `RawInputError` naming the file (and the line and
    column of a JSON error). A `.json` page or JSONL line larger than `STREAM_BYTES` is parsed item by item
    (ijson), so memory is bounded by the largest item rather than by the page.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    count = 0
    try:
        with opener(path, "rb") as handle:
            lines = ((1, handle),) if not is_jsonl else enumerate(handle, start=1)
            for number, line in lines:
                for item in _line_items(path, number, line, is_jsonl):
                    count += 1
                    yield number, item
    except (OSError, EOFError, zlib.error) as err:  # unreadable file, truncated or corrupted gzip
        raise RawInputError(f"{path}: cannot be read ({type(err).__name__}: {err}).") from err
    if count == 0:
        raise RawInputError(f"{path}: no records (an empty file or page); remove it from the input or fill it.")


def _line_items(path: Path, number: int, source: Any, is_jsonl: bool) -> Iterator[Any]:
    """The items of one `.json` document (`source` is its open file) or one JSONL line (`source` is its bytes)."""
    if is_jsonl and not source.strip():
        return
    if (len(source) if is_jsonl else _uncompressed_size(path)) > STREAM_BYTES:
        reopen = (
            (lambda: io.BytesIO(source))
            if is_jsonl
            else (lambda: (gzip.open if path.suffix == ".gz" else open)(path, "rb"))
        )
        try:
            yield from _stream_page_items(reopen)
        except ijson.JSONError as err:
            if not is_jsonl:
                raise RawInputError(f"{path}: invalid JSON ({err}).") from None
            yield RecordError(f"malformed JSON line, the items after the error are lost ({err})")
        return
    data = source if is_jsonl else source.read()
    if not data.strip():
        return
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line, column = _line_and_column(data, err.start, number)
        raise RawInputError(f"{path}: line {line}, column {column}: bytes that are not UTF-8 ({err.reason})") from None
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        if is_jsonl:
            yield RecordError(f"malformed JSON line (column {err.colno}: {err.msg})")
            return
        raise RawInputError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON ({err.msg}).") from None
    yield from _page_items(document)


def _line_and_column(data: bytes, offset: int, first_line: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return first_line + data.count(b"\n", 0, offset), offset - line_start + 1


def _uncompressed_size(path: Path) -> int:
    """Size of a raw file once decompressed (a gzip file's ISIZE trailer: exact below 4 GiB, one member)."""
    if path.suffix != ".gz":
        return path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return int.from_bytes(handle.read(4), "little")


def _stream_page_items(reopen: Callable[[], Any]) -> Iterator[Any]:
    """Items of a large page read incrementally: `{"items": [...]}` or a bare list of items.

    ijson's C backend stops at an integer beyond 64 bits; the page is then read on from that item with ijson's
    pure-Python backend, which keeps such integers (the record is quarantined later, as orjson's pages are).
    """
    yielded = 0
    try:
        with reopen() as handle:
            for item in _ijson_items(handle, ijson):
                yielded += 1
                yield item
    except ijson.JSONError as err:
        if "integer overflow" not in str(err):
            raise
        from ijson.backends import python as ijson_python

        with reopen() as handle:
            for index, item in enumerate(_ijson_items(handle, ijson_python)):
                if index >= yielded:
                    yield item


def _ijson_items(handle: Any, backend: Any) -> Iterator[Any]:
    head = handle.peek(64) if hasattr(handle, "peek") else handle.getvalue()[:64]
    return backend.items(handle, "item" if head.lstrip()[:1] == b"[" else "items.item", use_float=True)


def _page_items(document: Any) -> list[Any]:
    """Items of an API response page (`{"items": [...]}`), a bare list of items, or one item."""
    if isinstance(document, dict) and "items" in document:
        items = document["items"]
        return items if isinstance(items, list) else [items]
    if isinstance(document, list):
        return document
    return [document]


def _raw_files(raw_dir: Path, kind: str) -> list[Path]:
    """The raw pages under `raw_dir/kind`, sorted; what cannot be read is skipped with one warning of counts."""
    folder = raw_dir / kind
    if not folder.is_dir():
        return []
    files: list[Path] = []
    skipped: Counter[str] = Counter()
    visited: set[tuple[int, int]] = set()

    def unreadable(err: OSError) -> None:
        skipped["unreadable folder"] += 1
        logger.debug("cannot list %s: %s", err.filename, err)

    for root, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        identity = os.stat(root)
        if (identity.st_dev, identity.st_ino) in visited:  # reached again through a link: a loop
            skipped["symbolic-link loop"] += 1
            folders.clear()
            continue
        visited.add((identity.st_dev, identity.st_ino))
        for name in names:
            if not name.endswith(RAW_SUFFIXES):
                continue
            path = Path(root, name)
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                skipped["dangling link"] += 1
                continue
            except OSError as err:
                skipped["symbolic-link loop" if err.errno == errno.ELOOP else "unreadable file"] += 1
                continue
            if not stat.S_ISREG(mode):
                skipped["FIFO or other non-regular file"] += 1
                continue
            files.append(path)
    if skipped:
        details = ", ".join(f"{n} {what}{'s' if n > 1 else ''}" for what, n in sorted(skipped.items()))
        logger.warning("%s: skipped %s (their pages, if any, are not in the build).", folder, details)
    return sorted(files)


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
                quarantine.write(_canonical_json(record) + b"\n")

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
                size_category=size_category(report.filtered["images"]),
                report=report,
                salted=bool(salt),
                toxicity=toxicity_scorer is not None,
                max_browsing_level=max_browsing_level,
            ),
            encoding="utf-8",
        )
        refresh_dataset_info(tmp)
    return report


def _flattened(
    context: _BuildContext,
    files: list[Path],
    kind: str,
    flatten: Callable[..., list[dict[str, Any]]],
    quarantine: bool = True,
    desc: str | None = None,
) -> Iterator[tuple[int, Path, int, Any, list[dict[str, Any]]]]:
    """`(position, path, line, item, rows)` for every record that flattens, where `position` is
    `file_index << 40 | item_index`; the others are quarantined with their reason (or skipped when `quarantine`
    is False: the pass that picks the surviving duplicates)."""
    for file_index, path in enumerate(
        tqdm(files, desc=desc or f"{kind}s", unit="file", disable=not context.show_progress)
    ):
        for item_index, (line, item) in enumerate(iter_raw_items(path)):
            if isinstance(item, RecordError):
                if quarantine:
                    context.reject(kind, path, line, item.reason, item)
                continue
            try:
                rows = flatten(item, salt=context.salt)
            except RecordError as err:
                if quarantine:
                    context.reject(kind, path, line, err.reason, item)
                continue
            yield file_index << _POSITION_BITS | item_index, path, line, item, rows


def _canonical_json(value: Any) -> bytes:
    """Sorted-keys JSON bytes (the stdlib writes the integers beyond 64 bits that orjson refuses)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _digest(item: Any) -> int:
    """A 64-bit digest of a record's canonical JSON: the last tie-break between duplicates, independent of files."""
    return int.from_bytes(hashlib.blake2b(_canonical_json(item), digest_size=8).digest(), "little", signed=True)


def _milliseconds(moment: Any) -> int:
    return _OLDEST if moment is None else int(moment.timestamp() * 1000)


_OLDEST = np.iinfo(np.int64).min + 1  # a missing timestamp (negated, it still fits)


def _image_duplicates(context: _BuildContext, files: list[Path]) -> set[int]:
    """Positions (`file_index << 40 | item_index`) of the image records that lose to a duplicate of their `imageId`.

    Among the valid records with one `imageId`, the one with the newest `createdAt` survives, then the one with
    the smallest canonical-JSON digest, so the survivor depends on the records, not on file names or order
    (byte-identical copies keep the first). A first pass reads only the ids; the records of duplicated ids, and
    only those, are then flattened to find the valid ones and compared.
    """
    ids, positions = array("q"), array("q")  # 16 bytes per record
    for file_index, path in enumerate(tqdm(files, desc="image ids", unit="file", disable=not context.show_progress)):
        for item_index, (_, item) in enumerate(iter_raw_items(path)):
            image_id = item.get("id") if isinstance(item, dict) else None
            if type(image_id) is int and _INT64_MIN <= image_id <= _INT64_MAX:  # others: quarantined later
                ids.append(image_id)
                positions.append(file_index << _POSITION_BITS | item_index)
    ids_array = np.frombuffer(ids, dtype=np.int64)
    unique, counts = np.unique(ids_array, return_counts=True)
    contested = np.isin(ids_array, unique[counts > 1])
    if not contested.any():
        return set()
    wanted = set(np.frombuffer(positions, dtype=np.int64)[contested].tolist())
    best: dict[int, tuple[tuple[int, int], int]] = {}  # imageId → ((−createdAt, digest), position)
    losers: set[int] = set()
    for file_index in sorted({position >> _POSITION_BITS for position in wanted}):
        for item_index, (_, item) in enumerate(iter_raw_items(files[file_index])):
            position = file_index << _POSITION_BITS | item_index
            if position not in wanted:
                continue
            try:
                rows = flatten_image(item, salt=context.salt)
            except RecordError:
                continue  # quarantined with its own reason by the main pass
            key = (-_milliseconds(rows[0]["createdAt"]), _digest(item))
            image_id = rows[0]["imageId"]
            if image_id not in best or key < best[image_id][0]:
                if image_id in best:
                    losers.add(best[image_id][1])
                best[image_id] = (key, position)
            else:
                losers.add(position)
    return losers


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_POSITION_BITS = 40  # item index within a file; the file index goes above


def _model_survivors(context: _BuildContext, files: list[Path]) -> list[str | None]:
    """Per model record that flattens, `None` if it survives, else the reason it is quarantined.

    A model is a duplicate when its `modelId`, or one of its `modelVersionId`s or `fileId`s, belongs to another
    record. Records are taken by preference, newest `publishedAt` of their versions first, then smallest
    `modelId`, then smallest canonical-JSON digest, and each keeps its ids unless a preferred one has one of them.
    """
    claims, keys = [], []
    for _, _, _, item, rows in _flattened(context, files, "model", flatten_model, False, "model ids"):
        versions = {r["modelVersionId"] for r in rows}
        files_ = {r["fileId"] for r in rows if r["fileId"] is not None}
        claims.append((rows[0]["modelId"], versions, files_))
        newest = max(_milliseconds(r["publishedAt"]) for r in rows)
        keys.append((-newest, rows[0]["modelId"], _digest(item)))
    owner: dict[tuple[str, int], int] = {}
    reasons: list[str | None] = [None] * len(claims)
    for index in sorted(range(len(claims)), key=keys.__getitem__):
        model_id, versions, files_ = claims[index]
        wanted = [("modelId", model_id)] + [("modelVersionId", v) for v in sorted(versions)]
        wanted += [("fileId", f) for f in sorted(files_)]
        taken = next((claim for claim in wanted if claim in owner), None)
        if taken is None:
            owner.update(dict.fromkeys(wanted, model_id))
        else:
            reasons[index] = (
                f"duplicate {taken[0]} {taken[1]}: it belongs to modelId {owner[taken]}, kept as the preferred "
                "record (newest publishedAt, then smallest modelId)"
                if taken[0] != "modelId"
                else f"duplicate modelId {model_id}: another record of it is kept (newest publishedAt, then digest)"
            )
    return reasons


def _build_loras(context: _BuildContext, files: list[Path]) -> None:
    from imagegem_hf.data.schema import LORAS_COLUMNS

    tmp, reject = context.tmp, context.reject
    filtered, dropped, chunk_size = context.filtered, context.dropped, context.chunk_size

    sink = _ParquetSink(tmp / "loras" / SHARD_NAME, "loras")
    raw_tags: set[str] = set()
    kept_tags: set[str] = set()
    uploaders_raw: set[str] = set()
    uploaders_kept: set[str] = set()
    buffer: list[dict[str, Any]] = []
    raw_versions = 0
    survivors = _model_survivors(context, files)
    for index, (_, path, line, item, rows) in enumerate(_flattened(context, files, "model", flatten_model)):
        if survivors[index] is not None:
            reject("model", path, line, survivors[index], item)
            continue
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
    raw_prompts, kept_prompts = _SeenIds(), _SeenIds()
    raw_users: set[str] = set()
    kept_users: set[str] = set()
    pending: list[tuple[Path, int, Any, list[dict[str, Any]]]] = []

    def flush() -> None:
        if not pending:
            return
        records = [rows for _, _, _, rows in pending]
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

    losers = _image_duplicates(context, files)
    for position, path, line, item, rows in _flattened(context, files, "image", flatten_image):
        if position in losers:
            reason = (
                f"duplicate imageId {rows[0]['imageId']}: another record of it is kept (newest createdAt, then digest)"
            )
            reject("image", path, line, reason, item)
            continue
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

    return np.array(
        [
            int.from_bytes(hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
            for p in prompts
            if p
        ],
        dtype=np.int64,
    )
