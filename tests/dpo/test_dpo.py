"""DiffusionDPOTrainer: the loss against the formula written out here, the reference model, training, saving,
resuming and the bad inputs of a pair dataset."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image
from transformers import TrainerCallback

from imagegem_hf.dpo import DiffusionDPOCollator, DiffusionDPOConfig, DiffusionDPOTrainer, prepare_dpo_dataset
from imagegem_hf.dpo.trainer import LORA_WEIGHTS_NAME, load_dpo_weights
from imagegem_hf.testing import random_images, tiny_sd_pipeline


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pairs(n: int = 4, seed: int = 0) -> Dataset:
    images = random_images(2 * n, size=32, seed=seed)
    return Dataset.from_dict(
        {
            "jpg_0": [_png(im) for im in images[:n]],
            "jpg_1": [_png(im) for im in images[n:]],
            "label_0": [float(i % 2) for i in range(n)],
            "caption": [f"a photo number {i}" for i in range(n)],
        }
    )


def _deterministic_vae(pipe) -> None:
    """Make the VAE posterior (almost) a point mass, so that latents do not depend on the sampling noise."""
    conv = pipe.vae.quant_conv
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:] = 0
        conv.bias[half:] = -30.0


def _trainer(tmp_path, sdxl=False, mode="lora", beta=5000.0, eval_dataset=None, **kwargs) -> DiffusionDPOTrainer:
    pipe = tiny_sd_pipeline(seed=0, sdxl=sdxl)
    _deterministic_vae(pipe)
    defaults = dict(
        resolution=32,
        per_device_train_batch_size=2,
        max_steps=2,
        report_to=[],
        mode=mode,
        lora_rank=2,
        beta_dpo=beta,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    args = DiffusionDPOConfig(str(tmp_path / "out"), **defaults)
    return DiffusionDPOTrainer(pipe, args, train_dataset=_pairs(), eval_dataset=eval_dataset)


def _batch(trainer: DiffusionDPOTrainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(2)])


def _loss_written_out(trainer: DiffusionDPOTrainer, batch) -> torch.Tensor:
    """Diffusion-DPO (REFERENCE §4) computed step by step from the pipeline's parts, independently of the model.

    Each pair draws from a generator seeded with its `noise_seeds` entry, in the documented order: the winner's
    posterior sample, the loser's, the noise, the timestep."""
    pipe, model = trainer.pipeline, trainer.model
    scheduler = model.noise_scheduler
    with torch.no_grad():
        winners, losers = batch["pixel_values"][:, 0], batch["pixel_values"][:, 1]
        posterior = pipe.vae.encode(torch.cat([winners, losers])).latent_dist
        b, shape = winners.shape[0], posterior.mean.shape[1:]
        draws = []
        for seed in batch["noise_seeds"].tolist():
            generator = torch.Generator().manual_seed(seed)
            draws.append([torch.randn(shape, generator=generator) for _ in range(3)])
            draws[-1].append(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator))
        samples = torch.stack([d[0] for d in draws] + [d[1] for d in draws])
        latents = (posterior.mean + posterior.std * samples) * pipe.vae.config.scaling_factor
        noise = torch.stack([d[2] for d in draws])
        t = torch.cat([d[3] for d in draws])
        if model.is_sdxl:
            h1 = pipe.text_encoder(batch["input_ids"], output_hidden_states=True).hidden_states[-2]
            out2 = pipe.text_encoder_2(batch["input_ids_2"], output_hidden_states=True)
            hidden = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
            cond = {"text_embeds": out2.text_embeds, "time_ids": batch["add_time_ids"]}
        else:
            hidden, cond = pipe.text_encoder(batch["input_ids"])[0], None

    def mse(unet, x0):
        x_t = scheduler.add_noise(x0, noise, t)
        pred = unet(x_t, t, hidden, added_cond_kwargs=cond).sample
        return ((pred - noise) ** 2).mean(dim=(1, 2, 3))

    unet = pipe.unet
    model_w, model_l = mse(unet, latents[:b]), mse(unet, latents[b:])
    with torch.no_grad():
        if model.reference_unet is None:
            unet.disable_adapters()
            ref_w, ref_l = mse(unet, latents[:b]), mse(unet, latents[b:])
            unet.enable_adapters()
        else:
            ref_w, ref_l = mse(model.reference_unet, latents[:b]), mse(model.reference_unet, latents[b:])
    beta = trainer.args.beta_dpo
    return -F.logsigmoid(-0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))).mean()


def _perturb_trained_weights(trainer, scale: float = 0.05) -> None:
    """Move the trained weights away from the reference (a fresh LoRA is zero: model = reference)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.pipeline.unet.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_loss_equals_the_formula(tmp_path, sdxl, mode):
    trainer = _trainer(tmp_path, sdxl=sdxl, mode=mode, beta=100.0)
    _perturb_trained_weights(trainer)
    batch = _batch(trainer)
    ours = trainer.compute_loss(trainer.model, batch)
    expected = _loss_written_out(trainer, batch)
    # Batched (2B) vs per-half UNet calls differ by float rounding only (×β/2 in the loss).
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=2e-6)
    assert abs(ours.item() - np.log(2)) > 1e-4  # the model differs from the reference: not the trivial log 2


def test_loss_function_by_hand():
    from imagegem_hf.dpo import diffusion_dpo_loss

    loss, inside = diffusion_dpo_loss(
        torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.2]), torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.3]), 10.0
    )
    # inside = -5 * ((0.1-0.3) - 0) = 1.0 and -5 * ((0.4-0.2) - (0.2-0.3)) = -1.5
    torch.testing.assert_close(inside, torch.tensor([1.0, -1.5]))
    expected = (np.log1p(np.exp(-1.0)) + np.log1p(np.exp(1.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def _lora_grad_norm(trainer, batch) -> float:
    trainer.model.zero_grad()
    torch.manual_seed(0)
    trainer.compute_loss(trainer.model, batch).backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
    return float(torch.sqrt(sum((g**2).sum() for g in grads)))


def test_gradients_vanish_as_beta_goes_to_zero(tmp_path):
    trainer = _trainer(tmp_path, beta=5000.0)
    _perturb_trained_weights(trainer)
    batch = _batch(trainer)
    full = _lora_grad_norm(trainer, batch)
    trainer.model.beta = 1e-9
    tiny = _lora_grad_norm(trainer, batch)
    assert full > 1e-3
    assert tiny < full * 1e-9


def test_swapping_winner_and_loser_flips_the_margin(tmp_path):
    trainer = _trainer(tmp_path)
    _perturb_trained_weights(trainer)
    # Swapping moves each image to the other half of the UNet's (2B) batch, and in float32 an output depends on its
    # batch position at the rounding level (relative 1e-7 on mse ≈ 1); β/2 = 2500 turns that into ~3e-4 in
    # `inside`. In float64 the same rounding is ~1e-16 · 2500 ≈ 1e-12, so the antisymmetry holds to 1e-6 exactly.
    # The other difference is the VAE's sampling noise, which swapping hands to the other image: its std cannot go
    # below e^-15 (diffusers clamps the log-variance at -30), so scale the posterior mean up by 1e6 and the latent
    # scaling factor down by as much: the same latents, with sampling noise 3e-13 instead of 3e-7.
    vae = trainer.pipeline.vae
    half = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[:half] *= 1e6
        vae.quant_conv.bias[:half] *= 1e6
    vae.register_to_config(scaling_factor=vae.config.scaling_factor * 1e-6)
    trainer.model.double()
    batch = _batch(trainer)
    batch["pixel_values"] = batch["pixel_values"].double()
    swapped = dict(batch, pixel_values=batch["pixel_values"].flip(1))
    torch.manual_seed(5)
    out = trainer.model(**batch)
    torch.manual_seed(5)
    out_swapped = trainer.model(**swapped)
    assert out.inside.dtype == torch.float64 and out.inside.abs().min() > 1e-3
    torch.testing.assert_close(out_swapped.inside, -out.inside, rtol=0, atol=1e-6)


def test_lora_reference_is_the_base_unet_and_does_not_move(tmp_path):
    trainer = _trainer(tmp_path, learning_rate=1e-2, max_steps=3)
    batch = _batch(trainer)

    def terms():
        torch.manual_seed(7)
        with torch.no_grad():
            out = trainer.model(**batch)
        return out.ref_mse_w.clone(), out.model_mse_w.clone()

    ref_before, model_before = terms()
    # The adapter-free base UNet (the frozen copy of a full-mode trainer on the same base) gives the same terms.
    base = _trainer(tmp_path / "base", mode="full")
    torch.manual_seed(7)
    with torch.no_grad():
        base_out = base.model(**batch)
    torch.testing.assert_close(ref_before, base_out.ref_mse_w)
    torch.testing.assert_close(ref_before, base_out.model_mse_w)
    trainer.train()
    ref_after, model_after = terms()
    torch.testing.assert_close(ref_after, ref_before)
    assert not torch.allclose(model_after, model_before)


class _SameDrawsEveryEpoch(TrainerCallback):
    """Keep the collator at epoch 0: each step (one per epoch) then draws the noise and timesteps of the fixed
    evaluation below."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(0)


def test_a_few_steps_decrease_the_loss_on_a_fixed_batch(tmp_path):
    trainer = _trainer(tmp_path, learning_rate=1e-2, max_steps=10, beta=5000.0)
    trainer.train_dataset = trainer.train_dataset.select([0, 1])  # one batch: the fixed batch
    trainer.add_callback(_SameDrawsEveryEpoch(trainer.data_collator))  # runs after the trainer's own epoch callback
    batch = _batch(trainer)

    def fixed_loss():
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    before = fixed_loss()
    trainer.train()
    after = fixed_loss()
    assert before == pytest.approx(np.log(2))  # a fresh LoRA is zero: model = reference
    assert after < before - 0.1, (before, after)
    assert trainer.state.log_history[-2]["rewards/margins"] > 0  # logged implicit reward margin grew positive


def test_saved_lora_reloads_with_load_lora_weights(tmp_path):
    # alpha ≠ rank: the LoRA's scale alpha/rank = 4 must survive the save (diffusers' adapter metadata).
    trainer = _trainer(tmp_path, learning_rate=1e-2, max_steps=2, lora_alpha=8)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / LORA_WEIGHTS_NAME).is_file()
    fresh = tiny_sd_pipeline(seed=0)
    fresh.load_lora_weights(str(tmp_path / "final"))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    hidden = torch.randn(1, 77, 8)
    with torch.no_grad():
        expected = trainer.pipeline.unet(x, t, hidden).sample
        got = fresh.unet(x, t, hidden).sample
        base = tiny_sd_pipeline(seed=0).unet(x, t, hidden).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, expected)
    # The card names the run's settings.
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| β (beta_dpo) | 5000.0 |" in card and "rank 2" in card


def test_resuming_from_a_checkpoint_reproduces_the_run(tmp_path):
    # Empty-prompt dropout (and the default random flips) must resume too: the same captions in steps 3-4.
    # Two steps per epoch: checkpoint 1 is in the middle of the first epoch (the resumed run skips one batch), and
    # the resumed run then crosses into the second epoch.
    kwargs = dict(learning_rate=1e-2, max_steps=4, proportion_empty_prompts=0.5)
    first = _trainer(tmp_path / "a", save_strategy="steps", save_steps=1, **kwargs)
    first.train()
    resumed = _trainer(tmp_path / "b", **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-1"))
    assert resumed.state.global_step == 4

    def lora(trainer):
        return {k: v for k, v in trainer.pipeline.unet.state_dict().items() if "lora" in k}

    a, b = lora(first), lora(resumed)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(b[key], a[key]), key  # bit for bit


def test_lora_for_another_base_model_is_refused(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "sd15"))
    with pytest.raises(ValueError, match="another base model"):
        load_dpo_weights(tiny_sd_pipeline(seed=0, sdxl=True), tmp_path / "sd15")
    with pytest.raises(ValueError, match="another base model"):
        _trainer(tmp_path / "x", sdxl=True, max_steps=1).train(resume_from_checkpoint=str(tmp_path / "sd15"))


def test_nan_loss_stops_with_the_step(tmp_path):
    trainer = _trainer(tmp_path, mode="full")
    with torch.no_grad():
        trainer.pipeline.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 0"):
        trainer.train()


def test_bad_pairs_are_dropped_and_counted():
    good = _pairs(2)
    a, b = good[0]["jpg_0"], good[0]["jpg_1"]
    rows = {
        "jpg_0": [a, a, None, b"not an image", a, a, b],
        "jpg_1": [b, b, b, b, a, b, a],
        "label_0": [1.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.0],
        "caption": ["ok", "tie", "missing", "unreadable", "identical", "", "loser first"],
    }
    prepared, dropped = prepare_dpo_dataset(Dataset.from_dict(rows))
    assert dropped == {
        "tie": 1,
        "missing image": 1,
        "unreadable image": 1,
        "identical images": 1,
        "empty prompt": 1,
    }
    assert prepared["caption"] == ["ok", "loser first"]
    # label_0 = 0 means jpg_1 won: it becomes image_w.
    assert prepared[1]["image_w"] == a and prepared[1]["image_l"] == b
    with pytest.raises(ValueError, match="No trainable pair"):
        prepare_dpo_dataset(Dataset.from_dict({k: v[1:2] for k, v in rows.items()}))
    with pytest.raises(ValueError, match="needs columns"):
        prepare_dpo_dataset(Dataset.from_dict({"image": [a], "text": ["x"]}))


def test_collator_handles_mismatched_resolutions_and_empty_prompts():
    from imagegem_hf.testing import tiny_clip_tokenizer

    wide, tall = Image.new("RGB", (40, 24), (255, 0, 0)), Image.new("RGB", (32, 64), (0, 0, 255))
    tokenizer = tiny_clip_tokenizer()
    collator = DiffusionDPOCollator(tokenizer, resolution=16, tokenizer_2=tokenizer, proportion_empty_prompts=1.0)
    batch = collator([{"caption": "a red square", "image_w": _png(wide), "image_l": tall}])
    assert batch["pixel_values"].shape == (1, 2, 3, 16, 16)
    torch.testing.assert_close(batch["pixel_values"][0, 0, 0], torch.ones(16, 16))  # red = +1 on R
    torch.testing.assert_close(batch["pixel_values"][0, 1, 2], torch.ones(16, 16))  # blue = +1 on B
    # Winner 40×24 → 27×16, center crop left = (27 - 16) // 2 = 5.
    assert batch["add_time_ids"].tolist() == [[24.0, 40.0, 0.0, 5.0, 16.0, 16.0]]
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    assert torch.equal(batch["input_ids"], empty.input_ids)


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        DiffusionDPOConfig(str(tmp_path), mode="qlora", report_to=[])
    with pytest.raises(ValueError, match="multiple of 8"):
        DiffusionDPOConfig(str(tmp_path), resolution=100, report_to=[])


def test_activation_checkpointing_and_bf16_train_the_same_lora(tmp_path):
    trainer = _trainer(tmp_path, activation_checkpointing=True, bf16=True, max_steps=1)
    assert trainer.pipeline.vae.dtype == torch.bfloat16 and trainer.pipeline.text_encoder.dtype == torch.bfloat16
    lora = [p for p in trainer.pipeline.unet.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # trained weights stay in float32
    before = [p.detach().clone() for p in lora]
    trainer.train()
    assert trainer.pipeline.unet.is_gradient_checkpointing  # Trainer switched it on through the wrapper
    assert any(not torch.equal(a, p) for a, p in zip(before, lora, strict=True))


def test_evaluation_table_win_rates_and_grid(tmp_path):
    from imagegem_hf.dpo.evaluate import evaluate_pipelines
    from imagegem_hf.scoring import CLIPScore, PickScore
    from imagegem_hf.testing import tiny_clip_model

    clip, processor = tiny_clip_model(seed=3)
    scorers = {"PickScore": PickScore(clip, processor), "CLIP": CLIPScore(clip, processor)}
    base, other = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    report = evaluate_pipelines(
        {"base": base, "tuned": other}, ["a dog", "a car"], scorers, seeds=(0, 1), subset="dogs", **kwargs
    )
    scores = report.scores
    assert len(scores) == 8 and scores.model.tolist() == ["base"] * 4 + ["tuned"] * 4
    # Same seed, same pipeline → same images: the base regenerates its first image exactly.
    again = base(["a dog"], generator=[torch.Generator().manual_seed(0)], **kwargs).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(report.images["base"][0]))
    summary = report.summary
    base_pick = scores[scores.model == "base"].PickScore.to_numpy()
    tuned_pick = scores[scores.model == "tuned"].PickScore.to_numpy()
    assert summary.loc["tuned", "PickScore"] == pytest.approx(tuned_pick.mean())
    assert summary.loc["tuned", "PickScore win rate"] == pytest.approx((tuned_pick > base_pick).mean())
    assert summary.loc["base", "PickScore win rate"] == 0.0
    assert report.table().splitlines()[0] == (
        "| Model | Subset | PickScore | CLIP | PickScore win rate | CLIP win rate |"
    )
    paths = report.save(tmp_path)
    from PIL import Image as PILImage

    assert PILImage.open(paths["grid"]).size[1] == 2 * 128
    with pytest.raises(ValueError, match="prompts"):
        evaluate_pipelines({"base": base}, [], scorers)


class _RecordingTrainer(DiffusionDPOTrainer):
    """Keeps the caption ids of every training batch (the batches come from the DataLoader workers)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen = [*getattr(self, "seen", []), inputs["input_ids"].clone()]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_empty_prompt_masks_differ_across_workers_and_epochs(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    args = DiffusionDPOConfig(
        str(tmp_path / "out"),
        resolution=32,
        per_device_train_batch_size=8,
        num_train_epochs=2,
        dataloader_num_workers=2,
        dataloader_persistent_workers=True,  # the workers outlive the epoch: they must still see the new one
        proportion_empty_prompts=0.5,
        lora_rank=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = _RecordingTrainer(pipe, args, train_dataset=_pairs(16))
    trainer.train()
    empty_ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids[0]
    masks = [tuple(row.tolist() == empty_ids for row in ids) for ids in trainer.seen]
    assert len(masks) == 4  # two epochs of two batches, each batch from another worker
    assert 0 < sum(map(sum, masks)) < 32  # dropout happened, not everywhere
    # Each worker used to draw from a copy of one generator: both batches, and every epoch, had the same mask.
    assert masks[0] != masks[1] and masks[2] != masks[3]
    # Each pair's draw changes with the epoch (the batches are reshuffled, so compare pairs, not positions).
    decode = pipe.tokenizer.batch_decode
    kept = [{c for ids in trainer.seen[e : e + 2] for c in decode(ids, skip_special_tokens=True) if c} for e in (0, 2)]
    assert kept[0] != kept[1]


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    trainer = _trainer(
        tmp_path,
        learning_rate=1e-2,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,  # the loss rises on these alternating labels: step 1 is the best, not the last
        eval_dataset=_pairs(),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")

    def unet_output(lora_dir=None):
        unet = trainer.pipeline.unet
        if lora_dir is not None:
            fresh = tiny_sd_pipeline(seed=0)
            fresh.load_lora_weights(lora_dir)
            unet = fresh.unet
        torch.manual_seed(0)
        x, hidden = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 8)
        with torch.no_grad():
            return unet(x, torch.tensor([10]), hidden).sample

    torch.testing.assert_close(unet_output(), unet_output(best))
    assert not torch.allclose(unet_output(), unet_output(str(tmp_path / "out" / "checkpoint-3")))


def test_evaluation_is_deterministic_and_unaugmented(tmp_path):
    losses = []
    for augment in (True, False):
        augmentation = dict(proportion_empty_prompts=1.0, random_flip=True, random_crop=True)
        trainer = _trainer(tmp_path / str(augment), **(augmentation if augment else {"random_flip": False}))
        _perturb_trained_weights(trainer)  # a fresh LoRA is zero: every loss would be log 2
        trainer.eval_dataset = trainer.train_dataset
        losses += [trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]]
    # Same weights, same loss: each evaluation draws the same noise and timesteps, and batches the pairs
    # without empty prompts, random crops or flips (the augmented trainer evaluates like the plain one).
    assert losses[0] == losses[1] == losses[2] == losses[3]
    assert abs(losses[0] - np.log(2)) > 1e-4


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_callers_pipeline_is_not_modified(tmp_path, mode):
    pipe = tiny_sd_pipeline(seed=0)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe("a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    weights = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    args = DiffusionDPOConfig(
        str(tmp_path / "out"),
        resolution=32,
        per_device_train_batch_size=2,
        max_steps=1,
        mode=mode,
        lora_rank=2,
        bf16=True,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DiffusionDPOTrainer(pipe, args, train_dataset=_pairs(2))
    trainer.train()
    assert trainer.pipeline is not pipe and trainer.pipeline.unet is not pipe.unet
    assert trainer.pipeline.vae.dtype == torch.bfloat16 and pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert not getattr(pipe.unet, "_hf_peft_config_loaded", False)  # no adapter added to the caller's UNet
    assert {name: p for name, p in pipe.unet.named_parameters()}.keys() == weights.keys()
    assert all(torch.equal(p, weights[name]) for name, p in pipe.unet.named_parameters())
    after = pipe("a dog", generator=torch.Generator().manual_seed(0), **kwargs).images  # mixed dtypes used to fail
    np.testing.assert_array_equal(after, before)


def test_fp16_keeps_the_vae_in_float32(tmp_path):
    trainer = _trainer(tmp_path, fp16=True, max_steps=1)
    assert trainer.pipeline.vae.dtype == torch.float32
    assert trainer.pipeline.text_encoder.dtype == torch.float16 and trainer.pipeline.unet.dtype == torch.float16
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_streaming_datasets_train(tmp_path):
    args = DiffusionDPOConfig(
        str(tmp_path),
        resolution=32,
        max_steps=2,
        per_device_train_batch_size=2,
        lora_rank=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args, train_dataset=_pairs(4).to_iterable_dataset())
    trainer.train()
    assert trainer.state.global_step == 2


def test_a_prepared_layout_dataset_is_still_validated(tmp_path):
    prepared, _ = prepare_dpo_dataset(_pairs(4))
    rows = {key: [row[key] for row in prepared] for key in ("caption", "image_w", "image_l")}
    rows["image_w"][1] = rows["image_w"][1][:40]  # a truncated file
    rows["caption"][2] = ""
    trainer = DiffusionDPOTrainer(
        tiny_sd_pipeline(seed=0),
        DiffusionDPOConfig(str(tmp_path), resolution=32, use_cpu=True, report_to=[], lora_rank=2),
        train_dataset=Dataset.from_dict(rows),
    )
    assert trainer.dropped_pairs == {"train": {"unreadable image": 1, "empty prompt": 1}}
    assert len(trainer.train_dataset) == 2


def test_a_pairs_draws_do_not_depend_on_its_batch(tmp_path):
    # What makes 2 processes × 2 pairs train like 1 × 4: each pair's VAE sample, noise and timestep come from its
    # own seed (global draws used to give pair 2 the noise of pair 0 when it led its own batch).
    trainer = _trainer(tmp_path)
    _perturb_trained_weights(trainer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    with torch.no_grad():
        torch.manual_seed(0)
        whole = trainer.model(**trainer.data_collator(rows))
        torch.manual_seed(0)
        halves = [trainer.model(**trainer.data_collator(rows[i : i + 2])) for i in (2, 0)]
    for term in ("model_mse_w", "model_mse_l", "ref_mse_w", "inside"):
        split = torch.cat([getattr(halves[1], term), getattr(halves[0], term)])
        torch.testing.assert_close(split, getattr(whole, term), rtol=1e-5, atol=1e-3 if term == "inside" else 1e-6)
    assert whole.inside.abs().min() > 1e-2  # the terms are not trivially equal


def test_the_initial_lora_comes_from_the_run_seed_not_from_earlier_draws(tmp_path):
    def initial_lora(draws_before: int) -> dict[str, torch.Tensor]:
        pipe = tiny_sd_pipeline(seed=0)  # (seeds the global generator itself)
        torch.rand(draws_before)  # other work of the process, after loading the pipeline
        args = DiffusionDPOConfig(str(tmp_path / str(draws_before)), lora_rank=2, use_cpu=True, report_to=[])
        unet = DiffusionDPOTrainer(pipe, args, train_dataset=_pairs()).model.unet
        return {k: v.detach().clone() for k, v in unet.named_parameters() if v.requires_grad}

    first, second = initial_lora(0), initial_lora(7)
    assert first and first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=0, rtol=0, msg=key)
