"""A short stage-1 `PreferencePrototypeTrainer` run, the same under 1 process (in the test) and 2 (`torchrun`).

`python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed.preference_worker OUT` trains
4 steps (LoRA and vision tower) with a global batch of 4 examples and shuffled references (checkpoints at steps 2
and 4), then resumes a second run from step 2; each rank writes its weights, and the main process the logs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagegem_hf.preference import PreferencePrototypeModel
from imagegem_hf.preference.data import PreferenceCollator
from imagegem_hf.preference.sequence import PreferenceSequenceBuilder
from imagegem_hf.preference.trainer import (
    PreferencePrototypeTrainer,
    PreferencePrototypeTrainingConfig,
    preference_metrics,
    prepare_stage1,
)
from imagegem_hf.testing import tiny_vlm
from tests.distributed.file_audit import record_writes
from tests.preference.test_resume import N_REF, toy_examples

GLOBAL_BATCH, STEPS = 4, 4


def trainer(output_dir: Path, world_size: int) -> PreferencePrototypeTrainer:
    train, images = toy_examples(8, seed=7)
    validation, validation_images = toy_examples(4, seed=8)
    images.update(validation_images)
    backbone, processor = tiny_vlm(seed=0)
    model, _ = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=0, n_ref=N_REF)
    args = PreferencePrototypeTrainingConfig(
        output_dir=str(output_dir),
        stage=1,
        n_ref=N_REF,
        lora_dropout=0.0,  # dropout masks are drawn per process
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        per_device_eval_batch_size=GLOBAL_BATCH // world_size,
        max_steps=STEPS,
        optim="sgd",  # Adam would turn the float rounding of near-zero gradients into visible steps
        learning_rate=20.0,  # the tiny backbone starts near chance, with small gradients
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    builder = PreferenceSequenceBuilder.from_config(processor, model.config)
    collators = [
        PreferenceCollator(builder, images.__getitem__, n_ref=N_REF, shuffle_references=shuffle, seed=args.seed)
        for shuffle in (True, False)
    ]
    torch.manual_seed(0)  # the same LoRA initialisation in every process and run
    return PreferencePrototypeTrainer(
        model=prepare_stage1(model, args),
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collators[0],
        eval_data_collator=collators[1],
        compute_metrics=preference_metrics,
    )


def trained_weights(trained: PreferencePrototypeTrainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trained.model.named_parameters() if p.requires_grad}


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
