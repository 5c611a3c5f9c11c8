"""A short `DiffusionDPOTrainer` run, the same under 1 process (in the test) and 2 (`torchrun`, gloo).

`python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed.dpo_worker OUT` trains 4
steps with a global batch of 4 pairs (checkpoints at steps 2 and 4), then resumes a second run from step 2; each
rank writes its weights, and the main process the logs, so the test can compare them with a 1-process run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagegem_hf.dpo import DiffusionDPOConfig, DiffusionDPOTrainer
from imagegem_hf.testing import tiny_sd_pipeline
from tests.distributed.file_audit import record_writes
from tests.dpo.test_dpo import _pairs

GLOBAL_BATCH, STEPS = 4, 4


def trainer(output_dir: Path, world_size: int) -> DiffusionDPOTrainer:
    args = DiffusionDPOConfig(
        str(output_dir),
        resolution=32,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        per_device_eval_batch_size=GLOBAL_BATCH // world_size,
        max_steps=STEPS,
        # SGD: Adam divides each gradient by its own running scale, which turns the float rounding of a near-zero
        # gradient (it depends on the batch split and the all-reduce's summation order) into a step of ~1e-5.
        optim="sgd",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        lora_rank=2,
        proportion_empty_prompts=0.5,  # with the default random flips: collator draws too
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    torch.manual_seed(0)  # the same LoRA initialisation in every process and run
    return DiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args, train_dataset=_pairs(8), eval_dataset=_pairs(4, seed=1))


def trained_weights(dpo: DiffusionDPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in dpo.pipeline.unet.state_dict().items() if "lora" in k}


def run(out: Path, world_size: int, rank: int) -> None:
    """Train and evaluate, then (several processes) resume from step 2; write `weights_{run}_rank{rank}.safetensors`
    and (main process) `logs.json`."""
    with record_writes(out, out / f"writes_rank{rank}.json"):
        first = trainer(out / "a", world_size)
        first.train()
        metrics = first.evaluate()
    save_file(trained_weights(first), str(out / f"weights_a_rank{rank}.safetensors"))
    if world_size > 1:  # the resumed run is compared with the uninterrupted one of the same launch
        resumed = trainer(out / "b", world_size)
        resumed.train(resume_from_checkpoint=str(out / "a" / "checkpoint-2"))
        save_file(trained_weights(resumed), str(out / f"weights_b_rank{rank}.safetensors"))
    if rank == 0:
        (out / "logs.json").write_text(json.dumps({"history": first.state.log_history, "eval": metrics}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    from imagegem_hf.distributed import end_distributed, process_count_and_index

    count, index = process_count_and_index()
    run(Path(sys.argv[1]), count, index)
    end_distributed()
