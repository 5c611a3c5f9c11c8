"""WorkerPool: ordered results on worker processes, errors surface, one worker means this process."""

from __future__ import annotations

import os

import pytest

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
