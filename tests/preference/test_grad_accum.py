"""Gradient accumulation does not change the update: 4 × 1, 2 × 2 and 1 × 4 take the same SGD step."""

import pytest
import torch

from imagegem_hf.preference import PreferencePrototypeModel
from imagegem_hf.preference.data import PreferenceCollator, PreferenceExample
from imagegem_hf.preference.losses import DISLIKE, LIKE
from imagegem_hf.preference.trainer import (
    PreferencePrototypeTrainer,
    PreferencePrototypeTrainingConfig,
    prepare_stage1,
)
from imagegem_hf.testing import random_images, tiny_vlm

LR = 0.5


def toy_examples(n: int = 4):
    images = dict(zip([f"im{i}" for i in range(6 * n)], random_images(6 * n, size=16, seed=6), strict=True))
    examples = [
        PreferenceExample(
            f"u{i}",
            [(f"im{6 * i}", f"im{6 * i + 1}", "a red cat"), (f"im{6 * i + 2}", f"im{6 * i + 3}", "a castle")],
            f"im{6 * i + 4}",
            f"im{6 * i + 5}",
            f"prompt {i}",
            i % 2,
        )
        for i in range(n)
    ]
    return examples, images


def stage1_model(tmp_path, batch_size: int, accumulation: int):
    backbone, processor = tiny_vlm(seed=0)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=0, n_ref=2)
    args = PreferencePrototypeTrainingConfig(
        output_dir=str(tmp_path / f"{batch_size}x{accumulation}"),
        stage=1,
        n_ref=2,
        shuffle_references=False,
        lora_dropout=0.0,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # clipping would hide a scaled gradient
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    torch.manual_seed(0)  # the same LoRA initialisation in every run
    return prepare_stage1(model, args), builder, args


def reference_step(tmp_path, examples, images):
    """One hand-written SGD step on the mean loss of the 4 examples (loss written out from paper 003's formulas)."""
    model, builder, _ = stage1_model(tmp_path, 4, 1)
    batch = PreferenceCollator(builder, images.__getitem__, n_ref=2, shuffle_references=False)(examples)
    labels = batch.pop("labels")
    logits = model(**batch).logits.double()
    pos, neg = logits[labels == 1], logits[labels == 0]
    base = 0.5 * (-pos.log_softmax(-1)[:, LIKE] - neg.log_softmax(-1)[:, DISLIKE])
    aux = -torch.nn.functional.logsigmoid(pos[:, LIKE] - neg[:, LIKE])
    aux = aux - torch.nn.functional.logsigmoid(neg[:, DISLIKE] - pos[:, DISLIKE])
    loss = (base + aux).mean()
    loss.backward()
    # parameters the loss does not reach (LLaVA skips its vision tower's last layer) have no gradient
    update = {n: -LR * p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return update, float(loss)


@pytest.mark.parametrize(("batch_size", "accumulation"), [(4, 1), (2, 2), (1, 4)])
def test_gradient_accumulation_gives_the_update_and_loss_of_one_batch(tmp_path, batch_size, accumulation):
    examples, images = toy_examples()
    expected_update, expected_loss = reference_step(tmp_path / "reference", examples, images)
    model, builder, args = stage1_model(tmp_path, batch_size, accumulation)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    collator = PreferenceCollator(builder, images.__getitem__, n_ref=2, shuffle_references=False)
    trainer = PreferencePrototypeTrainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    trainer.train()
    moved = 0.0
    for name, param in model.named_parameters():
        if name in before:
            update = param.detach() - before[name]
            torch.testing.assert_close(update, expected_update[name].float(), rtol=1e-4, atol=1e-7, msg=name)
            moved = max(moved, update.abs().max().item())
    assert moved > 1e-4  # the step did move the weights
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-4)
