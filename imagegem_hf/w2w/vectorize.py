"""LoRA → weight-space vector along a fixed module layout, and the parallel map that streams many of them.

Kept apart from `space.py` (which needs diffusers) so that worker processes only import torch and the LoRA I/O.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imagegem_hf.w2w.lora_io import LoRA, map_lora
from imagegem_hf.w2w.reduce import reduced_factors
from imagegem_hf.w2w.safetensors_reader import ReadBuffer

ModuleSlot = tuple[str, int, int, tuple[int, ...], int]  # (name, out_features, in_features, kernel, offset)


def known_base(base: str | None) -> str | None:
    return None if base in (None, "unknown") else base


_thread_state = threading.local()


def _read_buffer() -> ReadBuffer:
    """This thread's buffer for LoRA files: each file is read, reduced and dropped before the next one."""
    if not hasattr(_thread_state, "buffer"):
        _thread_state.buffer = ReadBuffer()
    return _thread_state.buffer


@dataclass(frozen=True)
class Vectorizer:
    """Reduces a LoRA to `rank` per module and flattens it along `layout` (down factors, then up, per module).

    Picklable, so that a `WorkerPool` can run it in worker processes.

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
        lora = item if isinstance(item, LoRA) else map_lora(item, base=known_base(self.base), buffer=_read_buffer())
        if known_base(self.base) and known_base(lora.base) and lora.base != self.base:
            raise ValueError(f"Architecture mismatch: a {lora.base} LoRA in a {self.base} weight space.")
        return self.vectorize(lora)


def _one_thread() -> None:
    torch.set_num_threads(1)


class WorkerPool:
    """Worker processes that map functions over items in input order, with at most 2 × num_workers results in
    flight, so memory stays bounded however many LoRAs stream through. With one worker everything runs in this
    process. One pool serves several passes (the header scan, then the reduction), so workers start once.

    Processes, not threads: reading a LoRA and reducing its ~10³ small modules is mostly short Python-level work
    that threads would serialise on the GIL. Workers start like `torch.utils.data.DataLoader` workers (the
    platform's default start method) and run single-threaded.

    Example:
        ```python
        >>> from imagegem_hf.w2w.vectorize import WorkerPool
        >>> with WorkerPool(2) as pool:
        ...     list(pool.map(abs, [-1, -2, 3]))
        [1, 2, 3]
        ```
    """

    def __init__(self, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1, got {num_workers}.")
        self.num_workers = num_workers
        self.executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        if self.num_workers > 1:
            context = multiprocessing.get_context()
            self.executor = ProcessPoolExecutor(self.num_workers, mp_context=context, initializer=_one_thread)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (pending work is cancelled)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def map(self, function: Callable[[Any], Any], items: Iterable) -> Iterator:
        """`map(function, items)`, in order, on the workers."""
        if self.executor is None:
            yield from map(function, items)
            return
        pending: deque = deque()
        try:
            for item in items:
                pending.append(self.executor.submit(function, item))
                if len(pending) >= 2 * self.num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
