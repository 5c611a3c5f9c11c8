"""Reading a built dataset's configs and writing fetch outputs so that no half-written file is ever visible."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from imagegem_hf.hub import resolve


def config_dataset(dataset: str | os.PathLike, config: str) -> ds.Dataset:
    """The parquet files of one config of a built ImageGem dataset (a local folder or a Hub dataset repo id).

    Raises:
        FileNotFoundError: The folder has no parquet files for `config`.
    """
    root = resolve(dataset, repo_type="dataset")
    files = sorted((root / config).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{root} has no {config}/*.parquet files; is it a dataset built by `imagegem dataset build`?"
        )
    return ds.dataset([str(f) for f in files], format="parquet")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    write_atomic(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows).encode())


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete `.NAME.*.tmp` files left by a killed run in `folder` (not recursive); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".part"))]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


class FolderBusyError(FileExistsError):
    """Another process is writing the same output folder."""


class FolderLock:
    """An exclusive lock on an output folder (`fcntl.flock` on `.lock`), so two runs never write one folder.

    Raises:
        FolderBusyError: Another process holds the lock.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".lock"
        self._handle = None

    def __enter__(self) -> FolderLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise FolderBusyError(
                f"{self.path.parent} is being written by another process; wait for it to finish or pick another "
                "output folder."
            ) from None
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.close()
