"""Resuming from a checkpoint reproduces the uninterrupted run, reference shuffles and validation included."""

import torch

from imagegem_hf.preference import PreferencePrototypeModel
from imagegem_hf.preference.data import PreferenceExample
from imagegem_hf.preference.trainer import PreferencePrototypeTrainingConfig, train_preference_model
from imagegem_hf.testing import random_images, tiny_vlm
from tests.distributed import assert_same_weights

N_REF = 3


def toy_examples(n: int, seed: int):
    keys = [f"s{seed}-im{i}" for i in range(8 * n)]
    images = dict(zip(keys, random_images(len(keys), size=16, seed=seed), strict=True))
    examples = [
        PreferenceExample(
            f"u{i % 3}",
            [(keys[8 * i + 2 * r], keys[8 * i + 2 * r + 1], f"prompt {r}") for r in range(N_REF)],
            keys[8 * i + 6],
            keys[8 * i + 7],
            "a target",
            i % 2,
        )
        for i in range(n)
    ]
    return examples, images


def stage2_run(output_dir, max_steps: int, resume: bool = False):
    train, images = toy_examples(8, seed=7)
    validation, validation_images = toy_examples(2, seed=8)
    images.update(validation_images)
    backbone, processor = tiny_vlm(seed=0)
    model, _ = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=3, n_ref=N_REF)
    with torch.no_grad():
        model.prototypes.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    args = PreferencePrototypeTrainingConfig(
        output_dir=str(output_dir),
        stage=2,
        n_ref=N_REF,
        num_prototypes=3,
        shuffle_references=True,
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=5e-2,
        lr_scheduler_type="constant",  # the interrupted run stops early: its schedule must not depend on max_steps
        save_strategy="steps",
        save_steps=3,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trained = train_preference_model(
        model, processor, train, images.__getitem__, args, eval_examples=validation, resume_from_checkpoint=resume
    )
    return trained.prototypes.detach().clone()


def test_resuming_with_reference_shuffling_reproduces_the_uninterrupted_run(tmp_path):
    uninterrupted = stage2_run(tmp_path / "a", max_steps=6)  # 4 steps per epoch: the run crosses an epoch
    at_checkpoint = stage2_run(tmp_path / "b", max_steps=3)  # stops after the checkpoint at step 3
    resumed = stage2_run(tmp_path / "b", max_steps=6, resume=True)
    assert not torch.equal(resumed, at_checkpoint)  # steps 4–6 did change the prototypes
    torch.testing.assert_close(resumed, uninterrupted, atol=0, rtol=0)


def stage1_weights(output_dir, draws_before: int = 0, num_workers: int = 0, max_steps: int = 1):
    """A short stage-1 run after `draws_before` draws of other work in the process; the merged weights."""
    train, images = toy_examples(4, seed=7)
    backbone, processor = tiny_vlm(seed=0)
    model, _ = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=0, n_ref=N_REF)
    torch.rand(draws_before)
    args = PreferencePrototypeTrainingConfig(
        output_dir=str(output_dir),
        stage=1,
        n_ref=N_REF,
        shuffle_references=True,
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=1e-2,
        lora_r=4,
        dataloader_num_workers=num_workers,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trained = train_preference_model(model, processor, train, images.__getitem__, args)
    return {k: v.detach().clone() for k, v in trained.state_dict().items()}


def test_a_run_does_not_depend_on_what_the_process_drew_before(tmp_path):
    # The initial LoRA (and so the merged result) is drawn from the run's own seed.
    assert_same_weights(stage1_weights(tmp_path / "b", draws_before=5), stage1_weights(tmp_path / "a"), atol=0)


def test_a_dataloader_worker_trains_the_same_weights(tmp_path):
    # Two epochs of shuffled references: the worker draws each example's order as the main process would.
    assert_same_weights(
        stage1_weights(tmp_path / "b", num_workers=1, max_steps=4), stage1_weights(tmp_path / "a", max_steps=4), atol=0
    )
