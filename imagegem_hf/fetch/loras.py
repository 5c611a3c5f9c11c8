"""`imagegem w2w fetch-loras`: LoRA files of the `loras` config by `downloadUrl`, verified, ready for the W2W build.

Only the main file of each model version (`primary == 1`) in the safetensors format is fetched: other formats are
skipped without being downloaded, and a downloaded file is kept only if its SHA-256 equals `hashSHA256` and the
official `safetensors` library can read its header (nothing is ever unpickled). Files are streamed into
`OUT/.<modelVersionId>.part` and renamed to `OUT/<modelVersionId>.safetensors` once verified, so a file under its
final name is always complete and verified, and a rerun skips it. `OUT/manifest.jsonl` maps each file to its model
(id, name, base model, tags, rank, hash) and `OUT/failures.jsonl` lists what could not be fetched and why.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from tqdm.auto import tqdm

from imagegem_hf.fetch.client import FetchConfig, Fetcher, FetchOutcome
from imagegem_hf.fetch.storage import FolderLock, config_dataset, remove_stale_temporaries, write_jsonl_atomic

SAFETENSORS_FORMAT = "SafeTensor"  # the `format` value of safetensors files in Civitai's API
_DOWN_SUFFIXES = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "down.weight")
_ROW_COLUMNS = ("modelId", "modelName", "modelVersionId", "fileName", "baseModel", "tags", "format", "primary")


@dataclass
class LoraFetchReport:
    """Counts of one `fetch_loras` run (`selected == stored + failed + filtered + pending`).

    Attributes:
        selected: Main safetensors files of model versions that pass the filters.
        not_safetensors: Main files skipped without download because their format is not safetensors.
        stored: Verified files in the folder (`existing` of them from earlier runs).
        existing: Files already there from an earlier run (not downloaded again).
        failed: Files refused or not fetched for good, by reason in `reasons`.
        filtered: Downloaded files outside the requested rank range (deleted).
        pending: Files that hit transient faults (timeouts, 5xx, a dead server): rerun to fetch them.
        bytes: Bytes downloaded by this run.
    """

    selected: int = 0
    not_safetensors: int = 0
    stored: int = 0
    existing: int = 0
    failed: int = 0
    filtered: int = 0
    pending: int = 0
    bytes: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common()) or "none"
        text = (
            f"{self.selected:,} LoRA files selected ({self.not_safetensors:,} other main files skipped: not "
            f"safetensors): {self.stored:,} stored ({self.existing:,} from earlier runs), {self.failed:,} failed "
            f"({reasons}), {self.filtered:,} outside the rank range"
        )
        if self.pending:
            text += f", {self.pending:,} pending after transient faults: run again to resume"
        return text + "."


def lora_rank(path: str | os.PathLike) -> int:
    """The largest rank among a LoRA file's modules, read from its safetensors header (no tensor is loaded).

    Raises:
        ValueError: The file has no LoRA down/A matrices.
    """
    with safe_open(str(path), framework="numpy") as handle:
        ranks = [handle.get_slice(k).get_shape()[0] for k in handle.keys() if k.endswith(_DOWN_SUFFIXES)]
    if not ranks:
        raise ValueError(f"{path} has no LoRA down/A matrices (keys ending in {', '.join(_DOWN_SUFFIXES)}).")
    return max(ranks)


def select_loras(
    dataset: str | os.PathLike,
    base_models: list[str] | None = None,
    tags: list[str] | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Rows of the `loras` config to fetch, and how many main files were skipped as not safetensors.

    Args:
        dataset: A built dataset folder or a Hub dataset repo id.
        base_models: Keep rows whose `baseModel` contains one of these (case-insensitive; "SDXL" matches
            "SDXL 1.0").
        tags: Keep rows that carry every one of these tags (case-insensitive).
        limit: At most this many rows (in table order).
    """
    columns = [*_ROW_COLUMNS, "fileId", "hashSHA256", "downloadUrl"]
    rows = config_dataset(dataset, "loras").to_table(columns=columns).to_pylist()
    wanted_bases = [b.lower() for b in base_models or []]
    wanted_tags = {t.strip().lower() for t in tags or []}
    selected, not_safetensors, seen = [], 0, set()
    for row in rows:
        if row["primary"] != 1 or row["modelVersionId"] in seen:
            continue
        if wanted_bases and not any(b in (row["baseModel"] or "").lower() for b in wanted_bases):
            continue
        if wanted_tags and not wanted_tags <= {t.strip().lower() for t in (row["tags"] or "").split(",")}:
            continue
        if row["format"] != SAFETENSORS_FORMAT:
            not_safetensors += 1
            continue
        seen.add(row["modelVersionId"])
        selected.append(row)
        if limit is not None and len(selected) >= limit:
            break
    return selected, not_safetensors


def _verify(row: dict[str, Any], outcome: FetchOutcome) -> str:
    """A reason to refuse a downloaded file, or ""."""
    expected = (row["hashSHA256"] or "").lower()
    if outcome.sha256 != expected:
        return "sha256 mismatch"
    try:
        with safe_open(str(outcome.path), framework="numpy") as handle:
            handle.keys()
    except Exception as err:  # safetensors raises SafetensorError / OSError subclasses for every malformed header
        return f"not a safetensors file ({type(err).__name__})"
    return ""


def fetch_loras(
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config: FetchConfig | None = None,
    base_models: list[str] | None = None,
    tags: list[str] | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    limit: int | None = None,
    show_progress: bool = True,
) -> LoraFetchReport:
    """Download and verify the LoRA files of a built dataset's `loras` config; resumable.

    Args:
        dataset: A built dataset folder or a Hub dataset repo id.
        output_dir: Folder of `<modelVersionId>.safetensors` files (feeds `imagegem w2w build` directly).
        config: Concurrency, per-host rate, retries and timeouts.
        base_models: Only these base models (substring match on `baseModel`, e.g. `["SDXL"]`).
        tags: Only models carrying all of these tags.
        min_rank: Drop files whose largest module rank is below this (read from the downloaded header).
        max_rank: Drop files whose largest module rank is above this.
        limit: At most this many files.
        show_progress: Show a progress bar over files.

    Returns:
        A [`LoraFetchReport`] with the counts.

    Example:
        ```python
        >>> from imagegem_hf.fetch.loras import fetch_loras
        >>> report = fetch_loras("your-org/imagegem", "loras_sdxl", base_models=["SDXL"])  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
        ```
    """
    output_dir = Path(output_dir)
    rows, not_safetensors = select_loras(dataset, base_models, tags, limit)
    report = LoraFetchReport(selected=len(rows), not_safetensors=not_safetensors)
    with FolderLock(output_dir):
        remove_stale_temporaries(output_dir)
        todo = [r for r in rows if not (output_dir / f"{r['modelVersionId']}.safetensors").exists()]
        report.existing = len(rows) - len(todo)
        progress = tqdm(total=len(todo), desc="Fetching LoRAs", unit="file", disable=not show_progress)
        failures = asyncio.run(_download(todo, output_dir, config, min_rank, max_rank, report, progress))
        progress.close()
        manifest = []
        for row in rows:
            path = output_dir / f"{row['modelVersionId']}.safetensors"
            if path.exists():
                entry = {k: row[k] for k in ("modelId", "modelName", "modelVersionId", "baseModel", "tags")}
                entry.update(file=path.name, sha256=row["hashSHA256"].lower(), bytes=path.stat().st_size)
                entry["rank"] = lora_rank(path)
                manifest.append(entry)
        report.stored = len(manifest)
        write_jsonl_atomic(output_dir / "manifest.jsonl", manifest)
        write_jsonl_atomic(output_dir / "failures.jsonl", failures)
    return report


async def _download(rows, output_dir, config, min_rank, max_rank, report, progress) -> list[dict]:
    failures: list[dict[str, Any]] = []

    async def one(fetcher: Fetcher, row: dict[str, Any]) -> None:
        version = row["modelVersionId"]
        final = output_dir / f"{version}.safetensors"
        part = output_dir / f".{version}.part"
        record = {"modelVersionId": version, "url": row["downloadUrl"]}
        if not row["downloadUrl"] or not row["hashSHA256"]:
            reason = "no download url" if not row["downloadUrl"] else "no SHA-256 to verify"
            report.failed += 1
            report.reasons[reason] += 1
            failures.append({**record, "reason": reason, "transient": False})
            progress.update()
            return
        outcome = await fetcher.get(row["downloadUrl"], to_file=part)
        reason = _verify(row, outcome) if outcome.ok else outcome.reason
        if not reason and (min_rank is not None or max_rank is not None):
            rank = await asyncio.to_thread(lora_rank, part)
            if (min_rank is not None and rank < min_rank) or (max_rank is not None and rank > max_rank):
                part.unlink()
                report.filtered += 1
                progress.update()
                return
        if reason:
            part.unlink(missing_ok=True)
            if outcome.transient:
                report.pending += 1
            else:
                report.failed += 1
                report.reasons[reason] += 1
            failures.append({**record, "reason": reason, "status": outcome.status, "transient": outcome.transient})
        else:
            report.bytes += part.stat().st_size
            os.replace(part, final)
        progress.update()

    async with Fetcher(config) as fetcher:
        await asyncio.gather(*(one(fetcher, row) for row in rows))
    return sorted(failures, key=lambda f: f["modelVersionId"])


def read_manifest(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a `fetch_loras` folder's `manifest.jsonl`."""
    text = (Path(output_dir) / "manifest.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]
