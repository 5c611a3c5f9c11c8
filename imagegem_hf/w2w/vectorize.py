"""LoRA → weight-space vector along a fixed module layout, and the parallel map that streams many of them.

Kept apart from `space.py` (which needs diffusers) so that worker processes only import torch and the LoRA I/O.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .lora_io import LoRA, map_lora, read_lora_header
from .reduce import coordinate_modules, reduced_factors

ModuleSlot = tuple[str, int, int, tuple[int, ...], int]  # (name, out_features, in_features, kernel, offset)
ON_ERROR = ("raise", "skip")

logger = logging.getLogger(__name__)


def known_base(base: str | None) -> str | None:
    return None if base in (None, "unknown") else base


def component_groups(layout: Sequence[ModuleSlot], rank: int, vector_length: int) -> np.ndarray:
    """Which singular component of which module each coordinate of a vector belongs to: `(vector_length,)` int64,
    component j of the i-th module of `layout` being group `i · rank + j` (its `down` row j and `up` column j).

    Example:
        ```python
        >>> from imagegem_hf.w2w.vectorize import component_groups
        >>> component_groups([("a", 2, 3, (), 0)], rank=1, vector_length=5).tolist()
        [0, 0, 0, 0, 0]
        ```
    """
    groups = np.empty(vector_length, dtype=np.int64)
    for i, (_, n_out, n_in, _, offset) in enumerate(layout):
        components = i * rank + np.arange(rank)
        groups[offset : offset + rank * n_in] = np.repeat(components, n_in)  # down: (rank, in), row j
        groups[offset + rank * n_in : offset + rank * (n_in + n_out)] = np.tile(components, n_out)  # up: column j
    return groups


@dataclass(frozen=True, eq=False)
class Vectorizer:
    """Reduces a LoRA to `rank` per module and flattens it along `layout` (down factors, then up, per module).

    Picklable, so that a `WorkerPool` can run it in worker processes.

    Attributes:
        layout: `(name, out_features, in_features, kernel_size, offset)` per module, in vector order.
        rank: Singular components kept per module.
        vector_length: Length of the vectors.
        base: Base architecture of the space (`None`/`"unknown"`: not checked).
        sign_reference: The space's sign reference (`WeightSpace.build(align_signs=True)`), a vector in the layout:
            each reduced component is flipped (its `up` and `down` together, so ΔW is unchanged) where its dot
            product with the reference's is negative. `None`: the sign rule of the reduction alone.
    """

    layout: tuple[ModuleSlot, ...]
    rank: int
    vector_length: int
    base: str | None
    sign_reference: np.ndarray | None = None

    def vectorize(self, lora: LoRA, out: np.ndarray | None = None) -> tuple[np.ndarray, list[str], list[str]]:
        """`(vector, missing, ignored)`: the float32 vector (written into `out` if given), the layout modules the
        LoRA lacks (zero-filled), and the LoRA's modules outside the layout (dropped). Raises `ValueError` on a
        shape mismatch."""
        if out is None:
            vector = np.zeros(self.vector_length, dtype=np.float32)
        else:
            vector = out
            vector[:] = 0.0
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
        if self.sign_reference is not None:
            kept = coordinate_modules(lora, rank)  # a weight-space point (an edit) keeps its coordinates
            for name, n_out, n_in, _, offset in self.layout:
                if name in destinations and name not in kept:
                    _align_signs_(vector, self.sign_reference, offset, rank, n_in, n_out)
        ignored = sorted(set(lora.modules) - {slot[0] for slot in self.layout})
        return vector, missing, ignored

    def __call__(self, item: Any, out: np.ndarray | None = None) -> tuple[np.ndarray, list[str], list[str]]:
        """Vectorize a LoRA file, a `LoRA`, or check a vector already in the layout (into `out` if given)."""
        if isinstance(item, (np.ndarray, torch.Tensor)):
            vector = np.asarray(item, dtype=np.float32)
            if vector.shape != (self.vector_length,):
                raise ValueError(f"Expected a vector of length {self.vector_length}, got {vector.shape}.")
            if out is not None:
                out[:] = vector
                vector = out
            return vector, [], []
        lora = item if isinstance(item, LoRA) else map_lora(item, base=known_base(self.base))
        if known_base(self.base) and known_base(lora.base) and lora.base != self.base:
            raise ValueError(f"Architecture mismatch: a {lora.base} LoRA in a {self.base} weight space.")
        return self.vectorize(lora, out)


def _align_signs_(vector: np.ndarray, reference: np.ndarray, offset: int, rank: int, n_in: int, n_out: int) -> None:
    """In place: negate each component (down row j, up column j) of the module at `offset` whose dot product with
    the same coordinates of `reference` is negative."""
    stop = offset + rank * (n_in + n_out)
    down, up = vector[offset : offset + rank * n_in].reshape(rank, n_in), vector[offset + rank * n_in : stop]
    up = up.reshape(n_out, rank)
    ref_down = reference[offset : offset + rank * n_in].reshape(rank, n_in)
    ref_up = reference[offset + rank * n_in : stop].reshape(n_out, rank)
    dots = np.einsum("ji,ji->j", down, ref_down, dtype=np.float64)
    dots += np.einsum("oj,oj->j", up, ref_up, dtype=np.float64)
    flip = dots < 0
    if flip.any():
        down[flip] *= -1.0
        up[:, flip] *= -1.0


def _header_problem(item: Any, base: str | None) -> tuple[str | None, str | None]:
    """`(detected base, None)` for a readable LoRA file, `(None, why)` for one `load_lora` would refuse."""
    try:
        return read_lora_header(item, base=base)[0], None
    except (ValueError, OSError) as err:
        return None, str(err)


def drop_unreadable(
    loras: Sequence[Any],
    model_ids: Sequence[str] | None,
    on_error: str,
    base: str | None = None,
    num_workers: int = 1,
) -> tuple[Sequence[Any], Sequence[str] | None]:
    """With `on_error="skip"`, the LoRAs (and their `model_ids`) without the files that cannot be read: corrupt,
    truncated, not a plain LoRA, or of another base than `base` (by default the first readable file's). Each
    skipped file is logged with the reason. `on_error="raise"` returns the inputs unchanged (the build then stops
    at the first bad file). `LoRA` objects and vectors are always kept.

    Only the headers are read (in `num_workers` processes), so the check costs a small fraction of a build.

    Example:
        ```python
        >>> loras, ids = drop_unreadable(files, None, on_error="skip", base="sdxl")  # doctest: +SKIP
        ```
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
    if model_ids is not None and len(model_ids) != len(loras):
        raise ValueError(f"Got {len(model_ids)} model_ids for {len(loras)} LoRAs.")
    if on_error == "raise":  # unchanged: `loras` may be a lazy sequence of vectors
        return loras, model_ids
    ids = [Path(item).stem if isinstance(item, (str, os.PathLike)) else str(i) for i, item in enumerate(loras)]
    ids = ids if model_ids is None else list(model_ids)
    files = [i for i, item in enumerate(loras) if isinstance(item, (str, os.PathLike))]
    with WorkerPool(num_workers) as pool:
        problems = pool.map(partial(_header_problem, base=known_base(base)), [loras[i] for i in files])
        headers = dict(zip(files, problems, strict=True))
    skipped = []
    for index, (detected, problem) in headers.items():
        if problem is None and known_base(detected):
            if known_base(base) and detected != base:
                problem = f"{loras[index]} is a {detected} LoRA, the others are {base} (architecture mismatch)."
            base = base if known_base(base) else detected
        if problem is not None:
            skipped.append(index)
            logger.warning("Skipping LoRA %s: %s", loras[index], problem)
    if skipped:
        logger.warning("Skipped %d of %d LoRA files that cannot be read (listed above).", len(skipped), len(loras))
    dropped = set(skipped)
    kept = [i for i in range(len(loras)) if i not in dropped]
    return [loras[i] for i in kept], [ids[i] for i in kept]


def report_missing_modules(names: Sequence[str], missing: np.ndarray, n_loras: int) -> None:
    """Log the layout modules that some LoRAs lack (their part of the vector is zero-filled), with counts.

    Args:
        names: Module names of the layout.
        missing: Per module, how many of the LoRAs lack it.
        n_loras: LoRAs in the build.
    """
    lacking = np.flatnonzero(missing)
    if not len(lacking):
        return
    worst = lacking[np.argsort(-missing[lacking], kind="stable")][:5]
    logger.warning(
        "%d of the %d layout modules are missing from some of the %d LoRAs (%d module entries zero-filled); most "
        "often: %s. Per-module counts: the space's config `missing_counts`.",
        len(lacking),
        len(names),
        n_loras,
        int(missing.sum()),
        ", ".join(f"{names[i]} ({int(missing[i])}/{n_loras})" for i in worst),
    )


class SharedRows:
    """A ring of `n_slots` float32 rows of length `dim` in a memory-mapped file that every process maps: workers
    write result vectors straight into it and return only small metadata. Pickling a multi-megabyte vector through a
    pipe costs the worker and the parent more CPU than reducing a tenth of the LoRA.

    Item `index` uses slot `index % n_slots`, so `n_slots` must exceed the items in flight (`WorkerPool.in_flight`)
    and a row must be used before the item `n_slots` later is submitted. Picklable: a process maps the file the
    first time it needs a row.

    Example:
        ```python
        >>> from imagegem_hf.w2w.vectorize import SharedRows
        >>> rows = SharedRows("/tmp/rows.f32", n_slots=3, dim=4)  # doctest: +SKIP
        >>> rows.row(4)[:] = 1.0  # slot 1  # doctest: +SKIP
        ```
    """

    def __init__(self, path: str | os.PathLike, n_slots: int, dim: int):
        self.path, self.n_slots, self.dim = Path(path), n_slots, dim
        with open(self.path, "wb") as handle:
            handle.truncate(n_slots * dim * 4)
        self._rows: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "n_slots": self.n_slots, "dim": self.dim, "_rows": None}

    def close(self) -> None:
        """Unmap the file in this process (rows handed out keep it mapped as long as they live)."""
        self._rows = None

    def row(self, index: int) -> np.ndarray:
        """The slot of item `index`."""
        if self._rows is None:
            with open(self.path, "r+b") as handle:
                mapping = mmap.mmap(handle.fileno(), 0)
            self._rows = np.frombuffer(mapping, dtype=np.float32).reshape(self.n_slots, self.dim)
        return self._rows[index % self.n_slots]


def vectorize_into(vectorizer: Vectorizer, rows: SharedRows, indexed_item: tuple[int, Any]) -> tuple[list, list]:
    """Vectorize item `index` into its slot of `rows`; returns `(missing, ignored)` (see `Vectorizer.vectorize`)."""
    index, item = indexed_item
    _, missing, ignored = vectorizer(item, out=rows.row(index))
    return missing, ignored


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

    @property
    def in_flight(self) -> int:
        """The most items of one `map` submitted but not yet consumed."""
        return 2 * self.num_workers if self.num_workers > 1 else 1

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
                if len(pending) >= self.in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
