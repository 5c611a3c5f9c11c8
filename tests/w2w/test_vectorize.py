"""WorkerPool: ordered results on worker processes, errors surface, one worker means this process; vectorizing
uncached files on workers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from imagegem_hf.testing import single_torch_thread
from imagegem_hf.w2w.vectorize import WorkerPool


def _square_with_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("item 3 is broken")
    return x


def test_results_come_back_in_input_order_from_worker_processes():
    with WorkerPool(2) as pool:
        results = list(pool.map(_square_with_pid, range(9)))
        again = [value for value, _ in pool.map(_square_with_pid, range(3))]  # the pool serves several passes
    assert [value for value, _ in results] == [x * x for x in range(9)] and again == [0, 1, 4]
    assert os.getpid() not in {pid for _, pid in results}


def test_worker_errors_propagate_and_one_worker_runs_here():
    with WorkerPool(2) as pool, pytest.raises(ValueError, match="item 3 is broken"):
        list(pool.map(_fail_on_three, range(20)))
    with WorkerPool(1) as pool:  # in this process: even a lambda works
        assert list(pool.map(lambda x: (x, os.getpid()), [5])) == [(5, os.getpid())]
    with pytest.raises(ValueError, match="num_workers"):
        WorkerPool(0)


def test_uncached_files_vectorize_on_workers_like_in_this_process(tmp_path, evict):
    from imagegem_hf.w2w import LoRA, LoRAModule, WeightSpace, load_lora, save_lora

    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(4):  # 4 MB each: more than the kernel reads ahead with the header
        module = LoRAModule(
            down=torch.randn(64, 8192, generator=generator), up=torch.randn(8192, 64, generator=generator), alpha=8.0
        )
        paths.append(save_lora(LoRA({"unet.a.attn1.to_q": module}), tmp_path / f"l{i}.safetensors"))
    space = WeightSpace(
        module_names=["unet.a.attn1.to_q"], module_shapes=[[8192, 8192]], n_components=1, n_models=2, base="unknown"
    )
    vectorizer = space.vectorizer()
    with single_torch_thread():  # as in the workers: the same BLAS reduction order, so the same float32 rounding
        expected = [vectorizer(load_lora(path))[0] for path in paths]
    for path in paths:
        evict(path)
    with WorkerPool(2) as pool:
        vectors = [vector for vector, _, _ in pool.map(vectorizer, paths[::-1])]
    for vector, reference in zip(vectors, expected[::-1], strict=True):
        np.testing.assert_allclose(vector, reference, rtol=1e-5, atol=1e-6)


def _small_loras(tmp_path, n=4):
    from imagegem_hf.w2w import LoRA, LoRAModule, save_lora

    generator = torch.Generator().manual_seed(3)
    names = ["unet.a.attn1.to_q", "unet.a.attn1.to_v", "unet.b.attn1.to_q"]
    paths = []
    for i in range(n):
        modules = {
            name: LoRAModule(torch.randn(2, 6, generator=generator), torch.randn(5, 2, generator=generator))
            for name in (names if i else names[:1])  # the first LoRA lacks two modules
        }
        paths.append(save_lora(LoRA(modules), tmp_path / f"lora_{i}.safetensors"))
    return paths


def test_build_can_skip_and_list_unreadable_files(tmp_path, caplog):
    from imagegem_hf.w2w import WeightSpace

    paths = _small_loras(tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(paths[1].read_bytes()[:-10])
    not_a_lora = tmp_path / "notes.safetensors"
    not_a_lora.write_bytes(b"not a safetensors file")
    files = [paths[0], truncated, paths[1], not_a_lora, paths[2], paths[3]]
    with pytest.raises(ValueError, match="truncated.safetensors"):
        WeightSpace.build(files, n_components=2, show_progress=False)
    with caplog.at_level("WARNING", logger="imagegem_hf.w2w.vectorize"):
        space = WeightSpace.build(files, n_components=2, show_progress=False, on_error="skip")
    assert space.config.model_ids == ["lora_0", "lora_1", "lora_2", "lora_3"] and space.config.n_models == 4
    expected = WeightSpace.build(paths, n_components=2, show_progress=False)
    torch.testing.assert_close(space.components, expected.components)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping LoRA")]
    assert len(skipped) == 2 and "truncated.safetensors" in skipped[0] and "notes.safetensors" in skipped[1]
    assert any("Skipped 2 of 6 LoRA files" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="on_error"):
        WeightSpace.build(paths, n_components=2, on_error="ignore")


def test_build_reports_the_modules_loras_lack(tmp_path, caplog):
    from imagegem_hf.w2w import WeightSpace

    with caplog.at_level("WARNING", logger="imagegem_hf.w2w.vectorize"):
        space = WeightSpace.build(_small_loras(tmp_path), n_components=2, show_progress=False)
    assert space.config.missing_counts == [0, 1, 1]  # sorted layout: a.to_q, a.to_v, b.to_q
    message = next(r.getMessage() for r in caplog.records if "missing from some" in r.getMessage())
    assert message.startswith("2 of the 3 layout modules are missing from some of the 4 LoRAs (2 module entries")
    assert "unet.a.attn1.to_v (1/4)" in message


def _fill_row(rows, index: int) -> int:
    rows.row(index)[:] = index + 0.5
    return os.getpid()


def test_shared_rows_written_by_workers_are_read_here_and_slots_wrap(tmp_path):
    import pickle
    from functools import partial

    from imagegem_hf.w2w.vectorize import SharedRows

    with WorkerPool(2) as pool:
        rows = SharedRows(tmp_path / "rows.f32", n_slots=pool.in_flight + 1, dim=5)  # 5 slots
        rows.row(0)[:] = -1.0  # mapped here before pickling: the copy carries only the file's name
        assert pickle.loads(pickle.dumps(rows))._rows is None
        for index, pid in enumerate(pool.map(partial(_fill_row, rows), range(12))):
            assert pid != os.getpid()
            np.testing.assert_array_equal(rows.row(index), np.full(5, index + 0.5, dtype=np.float32))
    assert rows.row(1)[0] == rows.row(6)[0] == 11.5  # item 11 reused slot 1 (as item 6 did)
    assert (tmp_path / "rows.f32").stat().st_size == 5 * 5 * 4
