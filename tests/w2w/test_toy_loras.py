"""Toy user LoRAs: the stacked, per-row LoRAs equal diffusers' `load_lora_weights` of the saved kohya files."""

from __future__ import annotations

import pytest
import torch

from imagegem_hf.testing import tiny_sd_pipeline
from imagegem_hf.toy.loras import StackedLoRA
from imagegem_hf.w2w import load_lora, save_lora


@pytest.fixture(scope="module")
def stacked_and_files(tmp_path_factory):
    sd = tiny_sd_pipeline(seed=0)
    generator = torch.Generator().manual_seed(0)
    stacked = StackedLoRA.for_unet(sd.unet, ranks=[1, 3, 2], alphas=[1.0, 1.5, 2.0], generator=generator)
    with torch.no_grad():
        for up in stacked.up:
            up.normal_(generator=generator)
    folder = tmp_path_factory.mktemp("stacked")
    files = [save_lora(stacked.to_lora(k), folder / f"user_{k}.safetensors", format="kohya") for k in range(3)]
    return sd, stacked, files


def _inputs(rows: int):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(rows, 4, 16, 16, generator=generator), torch.randn(rows, 5, 8, generator=generator)


def _diffusers_outputs(sd, files, sample, context):
    """Row k through the UNet with file k loaded by diffusers (kohya keys converted by diffusers itself)."""
    outputs = []
    for k, path in enumerate(files):
        sd.load_lora_weights(str(path))
        outputs.append(sd.unet(sample[k : k + 1], 500, encoder_hidden_states=context[k : k + 1]).sample)
        sd.unload_lora_weights()
    return torch.cat(outputs)


@torch.no_grad()
def test_stacked_rows_equal_diffusers_loading(stacked_and_files):
    sd, stacked, files = stacked_and_files
    sample, context = _inputs(3)
    reference = _diffusers_outputs(sd, files, sample, context)
    base = sd.unet(sample, 500, encoder_hidden_states=context).sample
    assert (reference - base).abs().max() > 1e-2  # the LoRAs do something
    with stacked.apply(sd.unet, [0, 1, 2]):
        ours = sd.unet(sample, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sd.unet(sample, 500, encoder_hidden_states=context).sample, base)  # hooks removed
    # read back from the files, and with a doubled (classifier-free guidance) batch
    loaded = StackedLoRA.from_loras(sd.unet, [load_lora(f) for f in files])
    with loaded.apply(sd.unet, [0, 1, 2]):
        doubled = sd.unet(torch.cat([sample] * 2), 500, encoder_hidden_states=torch.cat([context] * 2)).sample
    torch.testing.assert_close(doubled, torch.cat([reference] * 2), atol=1e-5, rtol=1e-4)


def test_stacked_trains_each_lora_on_its_own_rows(stacked_and_files):
    sd, _, _ = stacked_and_files
    stacked = StackedLoRA.for_unet(
        sd.unet, ranks=[2, 2], alphas=[2.0, 2.0], generator=torch.Generator().manual_seed(0)
    )
    sample, context = _inputs(2)
    with stacked.apply(sd.unet, [0, 0]):  # both rows are LoRA 0's: LoRA 1 gets no gradient
        sd.unet(sample, 500, encoder_hidden_states=context).sample.square().mean().backward()
    grads = torch.stack([p.grad.flatten(1).abs().sum(1) for p in stacked.up]).sum(0)
    assert grads[0] > 0 and grads[1] == 0


def test_style_grade_and_measures_by_hand():
    import numpy as np
    from PIL import Image

    from imagegem_hf.toy.loras import UserStyle, style_measures

    grey = Image.new("RGB", (4, 4), (128, 128, 128))
    warm, bright = UserStyle(warmth=1.0, brightness=0.0).grade(grey), UserStyle(warmth=0.0, brightness=1.0).grade(grey)
    x = 128 / 255
    expected_warm = (round(255 * min(1.4 * x, 1.0)) - round(255 * 0.6 * x)) / 255  # R × 1.4, B × 0.6
    measured = style_measures([grey, warm, bright])
    np.testing.assert_allclose(measured["warmth"], [0.0, expected_warm, 0.0], atol=1e-9)
    np.testing.assert_allclose(measured["brightness"][2], round(255 * x ** (2**-0.7)) / 255, atol=1e-9)  # gamma 0.62


def test_style_measures_read_the_grade_off_the_background_not_the_subject():
    import numpy as np

    from imagegem_hf.toy.loras import UserStyle, style_measures
    from imagegem_hf.toy.world import ToySpec, render

    red_subject = render(ToySpec("red", "circle", "light", size=10.0))
    cool = UserStyle(warmth=-1.0, brightness=0.0).grade(red_subject)
    pixels = np.asarray(red_subject, dtype=np.float64) / 255
    assert (pixels[..., 0] - pixels[..., 2]).mean() > 0.05  # a whole-image mean would call this image warm
    measured = style_measures([red_subject, cool])
    grey = 0.85  # the light background, a neutral grey
    expected = (round(255 * 0.6 * grey) - min(round(255 * 1.4 * grey), 255)) / 255  # R × 0.6, B × 1.4 (clipped)
    np.testing.assert_allclose(measured["warmth"], [0.0, expected], atol=1 / 255)
    np.testing.assert_allclose(measured["brightness"], [round(255 * grey) / 255] * 2, atol=1 / 255)  # G is untinted


@pytest.mark.parametrize("weight_decay", [0.0, 1.0])
def test_user_loras_train_with_the_configured_weight_decay(monkeypatch, weight_decay):
    # One step by hand: AdamW's first update is lr · sign(g) (bias-corrected, eps aside), after the decoupled
    # decay p ← p · (1 − lr · wd). A factor that gets no gradient (`up` starts at zero, so `down` does not) only
    # decays.
    from imagegem_hf.toy import load_toy_pipeline
    from imagegem_hf.toy.loras import ToyLoRAConfig, UserStyle, train_user_loras

    captured = {}
    original = StackedLoRA.for_unet

    def for_unet(*args, **kwargs):
        captured["stacked"] = original(*args, **kwargs)
        captured["down"] = [p.detach().clone() for p in captured["stacked"].down]
        return captured["stacked"]

    monkeypatch.setattr(StackedLoRA, "for_unet", for_unet)
    config = ToyLoRAConfig(n_loras=2, ranks=(2,), images_per_lora=2, steps=1, weight_decay=weight_decay)
    loras, _ = train_user_loras(load_toy_pipeline(), [UserStyle(1.0, 0.0), UserStyle(-1.0, 0.5)], config, False)
    assert len(loras) == 2
    factor = 1 - config.learning_rate * weight_decay
    for before, after in zip(captured["down"], captured["stacked"].down, strict=True):
        torch.testing.assert_close(after.detach(), before * factor)
