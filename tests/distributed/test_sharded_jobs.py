"""Embedding jobs and `dpo eval` split across 2 CPU processes (`torchrun`, gloo) give exactly 1 process's results."""

from __future__ import annotations

import json

import numpy as np

from imagegem_hf.testing import random_images, single_torch_thread
from tests.distributed import jobs_worker
from tests.distributed.test_training import launch_two_processes
from tests.recsys.test_image_features import _write_dataset


def test_two_processes_embed_generate_and_score_exactly_like_one(tmp_path):
    ids = np.arange(100, 108)
    dataset = _write_dataset(tmp_path / "dataset", ids, ["u"] * len(ids), images=random_images(len(ids), size=32))
    (tmp_path / "two").mkdir()
    launch_two_processes("tests.distributed.jobs_worker", str(dataset), tmp_path / "two")
    (tmp_path / "one").mkdir()
    with single_torch_thread():  # as in the workers, whatever this machine's core count
        expected = jobs_worker.run(dataset, tmp_path / "one")
    got = np.load(tmp_path / "two" / "results.npz")
    assert sorted(got.files) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)  # bit for bit
    assert expected["eval_images"].shape == (12, 32, 32, 3) and expected["image_features"].shape == (8, 8)
    # The work was split: each process ran its batches only. 7 texts or images in batches of 3: batches 0 and 2 (4
    # rows) on rank 0, batch 1 (3 rows) on rank 1; the 8 cached images come in parts of 3, 3 and 2, each one batch
    # (rank 0); dpo eval generates batches of 4 then 2 images per pipeline.
    single = json.loads((tmp_path / "one" / "work_rank0.json").read_text())
    work = [json.loads((tmp_path / "two" / f"work_rank{r}.json").read_text()) for r in (0, 1)]
    assert single == {"clip text rows": 7, "clip image rows": 15, "sentence rows": 7, "decoded images": 12}
    assert work == [
        {"clip text rows": 4, "clip image rows": 4 + 8, "sentence rows": 4, "decoded images": 8},
        {"clip text rows": 3, "clip image rows": 3, "sentence rows": 3, "decoded images": 4},
    ]
    # The image-feature cache is written once, by the main process: the same parts as one process wrote.
    by_rank = [json.loads((tmp_path / "two" / f"writes_rank{r}.json").read_text()) for r in (0, 1)]
    assert by_rank[1] == [] and sorted(by_rank[0]) == sorted(set(by_rank[0]))
    assert sorted(by_rank[0]) == sorted(json.loads((tmp_path / "one" / "writes_rank0.json").read_text()))
    assert sorted(p.name for p in (tmp_path / "two" / "cache").iterdir()) == [
        f"part-0000{i}.parquet" for i in range(3)
    ]
