"""WorkerPool: ordered results on worker processes, errors surface, one worker means this process; vectorizing
uncached files on workers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

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


def test_uncached_files_vectorize_on_workers_through_private_read_buffers(tmp_path, evict):
    from imagegem_hf.w2w import LoRA, LoRAModule, WeightSpace, load_lora, save_lora
    from imagegem_hf.w2w.vectorize import _read_buffer

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
    expected = [vectorizer(load_lora(path))[0] for path in paths]
    parent = _read_buffer().read(paths[0], paths[0].stat().st_size)  # the workers fork with this buffer
    for path in paths:
        evict(path)
    with WorkerPool(2) as pool:
        vectors = [vector for vector, _, _ in pool.map(vectorizer, paths[::-1])]
    for vector, reference in zip(vectors, expected[::-1], strict=True):
        np.testing.assert_allclose(vector, reference, rtol=1e-5, atol=1e-6)  # BLAS rounding differs with alignment
    assert bytes(parent) == paths[0].read_bytes()  # the workers' reads went to their own copies


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
