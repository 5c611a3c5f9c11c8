"""Training under 2 CPU processes (`torchrun`, gloo) equals training under 1 with the same global batch.

One launch per trainer runs every check: after a few steps both ranks hold the same weights, equal (≤ 1e-6) to a
1-process run with 4 examples per step instead of 2 × 2; the checkpoint is written once, by the main process;
resuming under 2 processes reproduces the uninterrupted run; the logged metrics are those of the global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from imagegem_hf.testing import single_torch_thread
from tests.distributed import assert_same_weights, dpo_worker, preference_worker

ROOT = Path(__file__).resolve().parents[2]


def launch_two_processes(module: str, *arguments: str | Path) -> None:
    """Run `python -m module *arguments` in 2 processes with `torchrun` (gloo on CPU); fail with their stderr."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module]
    result = subprocess.run(
        [*command, *map(str, arguments)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("dpo2")
    launch_two_processes("tests.distributed.dpo_worker", two)
    one = tmp_path_factory.mktemp("dpo1")
    with single_torch_thread():  # as in the workers, whatever this machine's core count
        dpo_worker.run(one, world_size=1, rank=0)
    return one, two


def test_dpo_two_processes_train_like_one(dpo_runs):
    one, two = dpo_runs
    expected = load_file(one / "weights_a_rank0.safetensors")
    initial = dpo_worker.trained_weights(dpo_worker.trainer(one / "init", 1))
    assert max((expected[k] - initial[k]).abs().max() for k in expected) > 1e-3  # the steps moved the LoRA
    rank0, rank1 = (load_file(two / f"weights_a_rank{r}.safetensors") for r in (0, 1))
    assert_same_weights(rank1, rank0, atol=0)  # the ranks hold identical weights
    assert_same_weights(rank0, expected, atol=1e-6)  # and those of one process with the same global batch


def test_dpo_two_processes_resume_like_the_uninterrupted_run(dpo_runs):
    _, two = dpo_runs
    uninterrupted = load_file(two / "weights_a_rank0.safetensors")
    for rank in (0, 1):
        assert_same_weights(load_file(two / f"weights_b_rank{rank}.safetensors"), uninterrupted, atol=1e-6)


def test_dpo_checkpoint_is_written_once_by_the_main_process(dpo_runs):
    one, two = dpo_runs
    checkpoint = "a/checkpoint-2"
    single = files(one / checkpoint)
    # The only per-process files are the random states (one per rank), as in transformers' own layout.
    assert files(two / checkpoint) == (single - {"rng_state.pth"}) | {"rng_state_0.pth", "rng_state_1.pth"}
    per_rank = {f"checkpoint-{step}/rng_state_{rank}.pth" for step in (2, 4) for rank in (0, 1)}
    assert files(two / "a") - files(one / "a") == per_rank  # and nothing else anywhere in the output folder
    by_rank = [json.loads((two / f"writes_rank{r}.json").read_text()) for r in (0, 1)]
    assert {Path(p).name for p in by_rank[1]} <= {"rng_state_1.pth"}, by_rank[1]
    assert any(p.endswith("trainer_state.json") for p in by_rank[0])
    assert len(by_rank[0]) == len(set(by_rank[0]))  # no file written twice


def test_dpo_logged_metrics_are_those_of_the_global_batch(dpo_runs):
    one, two = dpo_runs
    single, double = (json.loads((run / "logs.json").read_text()) for run in (one, two))
    # The loss, the rewards and the gradient scale with β/2 = 2500 times differences of mse's, and so carry 2500 ×
    # the mse's float rounding (~1e-7: ~3e-4); the mse's themselves agree to 1e-6.
    keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "grad_norm")
    steps = [log for log in single["history"] if "loss" in log]
    assert len(steps) == dpo_worker.STEPS
    for got, expected in zip((log for log in double["history"] if "loss" in log), steps, strict=True):
        for key in keys:
            assert got[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-3), (got["step"], key)
        for key in ("mse/model_chosen", "mse/model_rejected"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (got["step"], key)
    for key in ("loss", "rewards/margins", "rewards/accuracies", "mse/model_chosen"):
        assert double["eval"][f"eval_{key}"] == pytest.approx(single["eval"][f"eval_{key}"], abs=1e-3), key


@pytest.fixture(scope="module")
def preference_runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("preference2")
    launch_two_processes("tests.distributed.preference_worker", two)
    one = tmp_path_factory.mktemp("preference1")
    with single_torch_thread():  # as in the workers, whatever this machine's core count
        preference_worker.run(one, world_size=1, rank=0)
    return one, two


def test_preference_two_processes_train_like_one(preference_runs):
    one, two = preference_runs
    expected = load_file(one / "weights_a_rank0.safetensors")
    initial = preference_worker.trained_weights(preference_worker.trainer(one / "init", 1))
    assert max((expected[k] - initial[k]).abs().max() for k in expected) > 1e-3  # the steps moved the weights
    rank0, rank1 = (load_file(two / f"weights_a_rank{r}.safetensors") for r in (0, 1))
    assert_same_weights(rank1, rank0, atol=0)
    assert_same_weights(rank0, expected, atol=1e-6)
    for rank in (0, 1):  # resuming under 2 processes reproduces the uninterrupted run
        assert_same_weights(load_file(two / f"weights_b_rank{rank}.safetensors"), rank0, atol=1e-6)


def test_preference_checkpoint_is_written_once_and_metrics_are_global(preference_runs):
    one, two = preference_runs
    per_rank = {f"checkpoint-{step}/rng_state_{rank}.pth" for step in (2, 4) for rank in (0, 1)}
    assert files(two / "a") - files(one / "a") == per_rank
    by_rank = [json.loads((two / f"writes_rank{r}.json").read_text()) for r in (0, 1)]
    assert {Path(p).name for p in by_rank[1]} <= {"rng_state_1.pth"}, by_rank[1]
    assert len(by_rank[0]) == len(set(by_rank[0]))
    single, double = (json.loads((run / "logs.json").read_text()) for run in (one, two))
    steps = [log for log in single["history"] if "loss" in log]
    assert len(steps) == preference_worker.STEPS
    for got, expected in zip((log for log in double["history"] if "loss" in log), steps, strict=True):
        # The tiny backbone stays near chance (loss ≈ 3 log 2): its examples' losses differ in the 5th decimal only,
        # and so do one process's mean and the global mean.
        for key in ("loss", "loss_base", "loss_aux"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (got["step"], key)
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), got["step"]
    for key in ("eval_loss", "eval_pairwise_accuracy"):
        assert double["eval"][key] == pytest.approx(single["eval"][key], rel=1e-5), key
