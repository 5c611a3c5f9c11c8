"""The lean safetensors reader: same tensors as the safetensors library, and every malformed file is refused."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from imagegem_hf.w2w import LoRA, LoRAModule, load_lora, safetensors_reader, save_lora
from imagegem_hf.w2w.lora_io import map_lora
from imagegem_hf.w2w.reduce import reduced_factors
from imagegem_hf.w2w.safetensors_reader import ReadBuffer, SafetensorsError, SafetensorsFile


def test_tensors_and_metadata_match_the_safetensors_library(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.f16": torch.randn(3, 5, generator=generator).half(),
        "b.bf16": torch.randn(7, generator=generator).bfloat16(),
        "c.f32": torch.randn(2, 3, 4, generator=generator),
        "d.f64": torch.randn(1, generator=generator, dtype=torch.float64),
        "e.i64": torch.arange(6).reshape(2, 3),
        "f.bool": torch.tensor([True, False, True]),
        "g.empty": torch.zeros(0, 4),
        "h.scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    handle = SafetensorsFile(path)
    assert handle.metadata == {"format": "pt", "note": "x"}
    expected = load_file(path)
    mapped = handle.tensors()
    assert set(mapped) == set(expected)
    for key, value in expected.items():
        assert mapped[key].dtype == value.dtype and torch.equal(mapped[key], value), key
    read = handle.read(["a.f16", "h.scalar"])
    assert torch.equal(read["a.f16"], expected["a.f16"]) and read["h.scalar"].item() == 2.5


def _write_raw(path, header: object, data: bytes = b"", header_bytes: bytes | None = None):
    raw = json.dumps(header).encode() if header_bytes is None else header_bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported dtype 'F99'"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes but spans 4"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "past the end of the file"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed shape"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "malformed shape"),
        ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed"),
        ({"x": [1, 2]}, b"", "malformed"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map strings to strings"),
        ([1, 2, 3], b"", "not a JSON object"),
    ],
)
def test_malformed_headers_are_refused(tmp_path, header, data, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(path)


def test_short_files_and_broken_json_are_refused(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="shorter than the 8-byte header length"):
        SafetensorsFile(short)
    oversized = tmp_path / "oversized.safetensors"
    oversized.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(SafetensorsError, match="does not fit"):
        SafetensorsFile(oversized)
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        SafetensorsFile(_write_raw(tmp_path / "json.safetensors", None, header_bytes=b"{not json"))


def test_map_lora_gives_file_dtype_views_that_reduce_like_the_copies(tmp_path):
    generator = torch.Generator().manual_seed(1)
    modules = {
        f"unet.b{i}.attn1.to_q": LoRAModule(
            down=torch.randn(4, 24, generator=generator), up=torch.randn(16, 4, generator=generator), alpha=2.0
        )
        for i in range(3)
    }
    path = save_lora(LoRA(modules), tmp_path / "l.safetensors", format="kohya", dtype=torch.float16)
    mapped, loaded = map_lora(path), load_lora(path)
    assert {m.down.dtype for m in mapped.modules.values()} == {torch.float16}
    assert {m.down.dtype for m in loaded.modules.values()} == {torch.float32}
    for name, module in mapped.modules.items():
        torch.testing.assert_close(module.down.float(), loaded.modules[name].down, rtol=0, atol=0)
        assert module.alpha == loaded.modules[name].alpha
    # fp16 factors are upcast exactly, so the reduction is the same, bit for bit
    from_views, from_copies = reduced_factors(mapped), reduced_factors(loaded)
    for name, (u, vt) in from_copies.items():
        assert torch.equal(from_views[name][0], u) and torch.equal(from_views[name][1], vt)


def test_read_buffer_reads_whole_files_into_one_reused_buffer(tmp_path):
    sizes = {"a": 10_000, "b": 3, "c": 3 * 4096 + 17}
    paths = {}
    for name, size in sizes.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(bytes((7 * i + len(name)) % 251 for i in range(size)))
    buffer = ReadBuffer()
    first = buffer.read(paths["a"], sizes["a"])
    assert bytes(first) == paths["a"].read_bytes()
    address = torch.frombuffer(first, dtype=torch.uint8).data_ptr()
    second = buffer.read(paths["b"], sizes["b"])  # smaller: the same memory, the first file is overwritten
    assert (
        bytes(second) == paths["b"].read_bytes() and torch.frombuffer(second, dtype=torch.uint8).data_ptr() == address
    )
    kept = torch.frombuffer(second, dtype=torch.uint8)
    third = buffer.read(paths["c"], sizes["c"])  # larger: a new allocation, views of the old one stay valid
    assert bytes(third) == paths["c"].read_bytes() and bytes(kept.tolist()) == paths["b"].read_bytes()
    with pytest.raises(SafetensorsError, match="ends after 3 of its 8 bytes"):
        buffer.read(paths["b"], 8)


def test_read_buffer_falls_back_to_an_ordinary_read_without_direct_io(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(9000))
    real_open = os.open

    def no_direct_io(file, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "direct I/O not supported")
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_io)
    assert bytes(ReadBuffer().read(path, 9000)) == path.read_bytes()
    monkeypatch.delattr(os, "O_DIRECT", raising=False)  # a platform without it
    assert bytes(ReadBuffer().read(path, 9000)) == path.read_bytes()


def test_uncached_files_are_read_into_the_buffer_and_cached_ones_mapped(tmp_path, monkeypatch, evict):
    generator = torch.Generator().manual_seed(2)
    tensors = {"x": torch.randn(300, 7, generator=generator).half(), "y": torch.randn(2**21, generator=generator)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    buffer = ReadBuffer()
    handle = SafetensorsFile(path)
    mapped = handle.tensors(buffer=buffer)  # just written: in the page cache, so mapped
    assert buffer._memory is None and all(torch.equal(mapped[k], v) for k, v in tensors.items())
    del mapped  # mapped pages cannot be evicted; 8 MB: reading the header does not read ahead to the end
    evict(path)
    read = SafetensorsFile(path).tensors(buffer=buffer)
    if buffer._memory is None:
        pytest.skip("this filesystem keeps files in memory (tmpfs)")
    address = torch.frombuffer(buffer._memory, dtype=torch.uint8).data_ptr()
    assert all(torch.equal(read[k], v) for k, v in tensors.items())
    assert address <= read["y"].data_ptr() < address + len(buffer._memory)
    del read
    monkeypatch.setattr(safetensors_reader, "MAX_BUFFERED_BYTES", 2**20)  # a larger file is mapped
    evict(path)
    large = ReadBuffer()
    mapped = SafetensorsFile(path).tensors(buffer=large)
    assert large._memory is None and all(torch.equal(mapped[k], v) for k, v in tensors.items())
