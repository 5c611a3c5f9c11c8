"""A lean, validating reader of safetensors files for bulk LoRA ingestion.

`safetensors.safe_open(...).get_tensor` copies every tensor out of its memory map, one call per key: for a
rank-32 SDXL LoRA (about 1,000 tensors, 80 MB) that is a third of the time it takes to reduce it. This reader
parses the header itself (the format is 8 bytes of little-endian header length, a JSON header, then the raw
little-endian data), checks every entry against the file, maps the file once (pages read ahead in one go where
the platform allows) and returns zero-copy views into the mapping. Nothing is ever unpickled.

Views stay valid as long as they are referenced (they keep the mapping alive). They are read-only, as with
`safe_open`'s own mapping: copy a tensor before modifying it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100 * 2**20  # the limit the safetensors library enforces
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file (corrupt header, truncated data, inconsistent entries)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the file.

    Attributes:
        dtype: The torch dtype.
        shape: The tensor shape.
        offset: Byte offset of its data from the start of the file.
        nbytes: Size of its data in bytes.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SafetensorsFile:
    """The header of a safetensors file, validated against the file size, and zero-copy access to its tensors.

    Args:
        path: The `.safetensors` file.

    Raises:
        SafetensorsError: A header that is not JSON, too long, or whose entries have an unknown dtype, a size
            that does not match their shape, or data beyond the end of the file (a truncated download).

    Example:
        ```python
        >>> from imagegem_hf.w2w.safetensors_reader import SafetensorsFile
        >>> handle = SafetensorsFile("lora.safetensors")  # doctest: +SKIP
        >>> tensors = handle.tensors()  # views into one memory map  # doctest: +SKIP
        ```
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"the file is {size} bytes, shorter than the 8-byte header length")
            header_bytes = int.from_bytes(prefix, "little")
            if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > size:
                raise SafetensorsError(f"a header of {header_bytes} bytes does not fit in the {size}-byte file")
            try:
                header = json.loads(handle.read(header_bytes))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise SafetensorsError(f"the header is not valid JSON ({err})") from err
        if not isinstance(header, dict):
            raise SafetensorsError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError("__metadata__ must map strings to strings")
        self.metadata: dict[str, str] = metadata
        data_start = 8 + header_bytes
        self.entries: dict[str, TensorEntry] = {
            key: _entry(key, info, data_start, size) for key, info in header.items()
        }

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensors(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors as read-only views into one memory map of the file (all keys by default).

        Copy a tensor (`.clone()`, `.to(dtype, copy=True)`) before modifying it: the mapping is read-only.
        """
        keys = self.keys() if keys is None else keys
        with open(self.path, "rb") as handle:  # not empty: the header was read from it
            if hasattr(mmap, "MAP_POPULATE"):  # Linux: read the whole file ahead in one go
                mapping = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
            else:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # torch warns that the views are not writable: they are read-only
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return {key: _view(mapping, self.entries[key]) for key in keys}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Tensors copied out of the file with one positioned read each (for a few small tensors, like alphas)."""
        tensors = {}
        with open(self.path, "rb") as handle:
            for key in keys:
                entry = self.entries[key]
                data = os.pread(handle.fileno(), entry.nbytes, entry.offset)
                if len(data) != entry.nbytes:
                    raise SafetensorsError(f"tensor {key!r} is cut short by the end of the file")
                tensors[key] = _view(bytearray(data), TensorEntry(entry.dtype, entry.shape, 0, entry.nbytes))
        return tensors


def _entry(key: str, info: object, data_start: int, size: int) -> TensorEntry:
    try:
        name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        valid = type(begin) is int and type(end) is int and 0 <= begin <= end and all(type(d) is int for d in shape)
    except (TypeError, KeyError, ValueError) as err:
        raise SafetensorsError(f"the entry of {key!r} is malformed ({err!r}): {info!r}") from err
    dtype = DTYPES.get(name)
    if dtype is None:
        raise SafetensorsError(f"tensor {key!r} has an unsupported dtype {name!r}")
    if not valid or any(d < 0 for d in shape):
        raise SafetensorsError(f"tensor {key!r} has a malformed shape {list(shape)} or data_offsets {[begin, end]}")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise SafetensorsError(f"tensor {key!r} of shape {list(shape)} needs {expected} bytes but spans {end - begin}")
    if data_start + end > size:
        raise SafetensorsError(f"tensor {key!r} ends past the end of the file (truncated)")
    return TensorEntry(dtype=dtype, shape=shape, offset=data_start + begin, nbytes=end - begin)


def _view(buffer, entry: TensorEntry) -> torch.Tensor:
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    count = entry.nbytes // entry.dtype.itemsize
    return torch.frombuffer(buffer, dtype=entry.dtype, count=count, offset=entry.offset).reshape(entry.shape)
