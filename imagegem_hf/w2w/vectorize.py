"""LoRA → weight-space vector along a fixed module layout, and the parallel map that streams many of them.

Kept apart from `space.py` (which needs diffusers) so that worker processes only import torch and the LoRA I/O.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagegem_hf.w2w.lora_io import LoRA, load_lora
from imagegem_hf.w2w.reduce import reduced_factors

ModuleSlot = tuple[str, int, int, tuple[int, ...], int]  # (name, out_features, in_features, kernel, offset)


def known_base(base: str | None) -> str | None:
    return None if base in (None, "unknown") else base


@dataclass(frozen=True)
class Vectorizer:
    """Reduces a LoRA to `rank` per module and flattens it along `layout` (down factors, then up, per module).

    Picklable, so that `ordered_map` can run it in worker processes.

    Attributes:
        layout: `(name, out_features, in_features, kernel_size, offset)` per module, in vector order.
        rank: Singular components kept per module.
        vector_length: Length of the vectors.
        base: Base architecture of the space (`None`/`"unknown"`: not checked).
    """

    layout: tuple[ModuleSlot, ...]
    rank: int
    vector_length: int
    base: str | None

    def vectorize(self, lora: LoRA) -> tuple[np.ndarray, list[str], list[str]]:
        """`(vector, missing, ignored)`: the float32 vector, the layout modules the LoRA lacks (zero-filled), and
        the LoRA's modules outside the layout (dropped). Raises `ValueError` on a shape mismatch."""
        vector = np.zeros(self.vector_length, dtype=np.float32)
        flat, rank = torch.from_numpy(vector), self.rank
        missing, destinations = [], {}
        for name, n_out, n_in, _, offset in self.layout:
            module = lora.modules.get(name)
            if module is None:
                missing.append(name)
                continue
            if (module.out_features, module.in_features) != (n_out, n_in):
                raise ValueError(
                    f"Architecture mismatch: module {name} is {module.out_features}×{module.in_features} in this "
                    f"LoRA but {n_out}×{n_in} in the weight space ({self.base}). Use LoRAs of the same base."
                )
            down = flat[offset : offset + rank * n_in].view(rank, n_in)
            destinations[name] = (flat[offset + rank * n_in : offset + rank * (n_in + n_out)].view(n_out, rank), down)
        reduced_factors(lora, rank, out=destinations)  # written straight into the vector
        ignored = sorted(set(lora.modules) - {slot[0] for slot in self.layout})
        return vector, missing, ignored

    def __call__(self, item: Any) -> tuple[np.ndarray, list[str], list[str]]:
        """Vectorize a LoRA file, a `LoRA`, or check a vector already in the layout."""
        if isinstance(item, (np.ndarray, torch.Tensor)):
            vector = np.asarray(item, dtype=np.float32)
            if vector.shape != (self.vector_length,):
                raise ValueError(f"Expected a vector of length {self.vector_length}, got {vector.shape}.")
            return vector, [], []
        lora = item if isinstance(item, LoRA) else load_lora(item, base=known_base(self.base))
        if known_base(self.base) and known_base(lora.base) and lora.base != self.base:
            raise ValueError(f"Architecture mismatch: a {lora.base} LoRA in a {self.base} weight space.")
        return self.vectorize(lora)


def _one_thread() -> None:
    torch.set_num_threads(1)


def ordered_map(
    function: Callable[[Any], Any], items: Iterable, num_workers: int, read_ahead: bool = False
) -> Iterator:
    """`map(function, items)` in input order on `num_workers` worker processes (each on one core), with at most
    2 × num_workers results in flight, so memory stays bounded however many LoRAs stream through.

    Processes, not threads: reading a LoRA and reducing its ~10³ small modules is mostly short Python-level work
    that threads would serialise on the GIL. Workers start like `torch.utils.data.DataLoader` workers (the
    platform's default start method) and run single-threaded. With `read_ahead`, the files among `items` are read
    into the page cache by a background thread a few items ahead of the workers (`ReadAhead`), so that reading
    from disk overlaps with computing.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be ≥ 1, got {num_workers}.")
    items = list(items)
    prefetcher = ReadAhead(items, depth=3 * num_workers) if read_ahead else None
    try:
        for result in _ordered_map(function, items, num_workers):
            if prefetcher is not None:
                prefetcher.advance()
            yield result
    finally:
        if prefetcher is not None:
            prefetcher.close()


def _ordered_map(function: Callable[[Any], Any], items: list, num_workers: int) -> Iterator:
    if num_workers == 1:
        yield from map(function, items)
        return
    context = multiprocessing.get_context()
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_one_thread) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ReadAhead:
    """Reads the files among `items` into the OS page cache on a background thread, in order, at most `depth`
    items ahead of the consumer (`advance()` once per item consumed).

    A large LoRA collection is read from disk, not from cache; without read-ahead the workers sit idle while
    each file is read. The thread copies each file to `/dev/null` with `sendfile` (the kernel reads the pages
    into its cache without copying them to user space, and the GIL is released while it waits on the disk), so it
    costs almost no CPU. Read errors are ignored here: the real read reports them. A no-op where `sendfile` to
    `/dev/null` is not available.
    """

    def __init__(self, items: list, depth: int):
        self.paths = [_safetensors_path(item) for item in items]
        self.slots = threading.Semaphore(depth)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="w2w-read-ahead", daemon=True)
        if hasattr(os, "sendfile"):
            self.thread.start()

    def _run(self) -> None:
        sink = os.open(os.devnull, os.O_WRONLY)
        try:
            for path in self.paths:
                self.slots.acquire()
                if self.closed.is_set():
                    return
                if path is not None and not _send_to(sink, path):
                    return  # sendfile cannot write to /dev/null on this platform
        finally:
            os.close(sink)

    def advance(self) -> None:
        self.slots.release()

    def close(self) -> None:
        self.closed.set()
        self.slots.release()
        if self.thread.is_alive():
            self.thread.join()


def _send_to(sink: int, path: Path) -> bool:
    """Read `path` through the page cache into `sink`; False if the platform refuses sendfile to it."""
    try:
        source = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        size, offset = os.fstat(source).st_size, 0
        while offset < size:
            sent = os.sendfile(sink, source, offset, size - offset)
            if sent == 0:
                break
            offset += sent
    except OSError as err:
        return err.errno not in (errno.EINVAL, errno.ENOTSOCK, errno.ENOSYS)
    finally:
        os.close(source)
    return True


def _safetensors_path(item: Any) -> Path | None:
    if not isinstance(item, (str, os.PathLike)):
        return None
    path = Path(item)
    return path / "adapter_model.safetensors" if path.is_dir() else path
