"""An edited LoRA written by us loads through diffusers into the tiny UNet, exactly, and its effect grows with α;
W2WEditPipeline generates one image per strength from the same seed and round-trips through save/from_pretrained."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from imagegem_hf.testing import tiny_sd_pipeline
from imagegem_hf.w2w import W2WEditPipeline, WeightSpace, lora_target_shapes, preference_direction, save_lora
from imagegem_hf.w2w.demo import ATTENTION_TARGETS, synthetic_loras

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


@pytest.fixture(scope="module")
def setup():
    sd = tiny_sd_pipeline(seed=0)
    shapes = lora_target_shapes(sd.unet, ATTENTION_TARGETS)
    loras, labels, _ = synthetic_loras(shapes, n=16, seed=2)
    space = WeightSpace.build(loras, n_components=6, show_progress=False)
    direction = preference_direction(space, None, labels, test_fraction=0)
    return sd, space, loras, direction


def _plain_image(pipe, lora, prompt: str, seed: int, steps: int):
    """One 32×32 image of a plain diffusers pipeline with `lora` loaded through `load_lora_weights` (then unloaded)."""
    pipe.load_lora_weights(lora.to_diffusers_state_dict())
    image = pipe(
        prompt,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=steps,
        height=32,
        width=32,
        guidance_scale=5.0,
    ).images[0]
    pipe.unload_lora_weights()
    return image


def _unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 5, 8, generator=generator)
    return unet(sample, 500, encoder_hidden_states=context).sample


def test_edited_lora_loads_exactly_and_changes_output_monotonically(setup, tmp_path):
    sd, space, loras, direction = setup
    base_out = _unet_output(sd.unet)
    distances = []
    for i, alpha in enumerate([0.0, 1.0, 2.0, 3.0]):
        edited = space.edit(loras[0], direction, alpha)
        path = save_lora(edited, tmp_path / f"edit_{alpha}.safetensors", format="kohya" if i % 2 else "diffusers")
        sd.load_lora_weights(str(path))
        out = _unet_output(sd.unet)
        sd.unload_lora_weights()
        # independent check: merge W + ΔW by hand into a copy of the UNet
        merged = copy.deepcopy(sd.unet)
        layers = dict(merged.named_modules())
        with torch.no_grad():
            for name, module in edited.modules.items():
                layers[name.removeprefix("unet.")].weight += module.delta_weight()
        torch.testing.assert_close(out, _unet_output(merged), atol=1e-5, rtol=1e-4)
        if alpha == 0.0:
            zero_out = out
            assert not torch.allclose(out, base_out)
        distances.append(float((out - zero_out).norm().detach()))
    torch.testing.assert_close(_unet_output(sd.unet), base_out)  # unloaded cleanly
    assert distances[0] == 0.0 and all(a < b for a, b in zip(distances, distances[1:], strict=False))


def test_pipeline_one_image_per_strength_same_seed(setup):
    sd, space, loras, direction = setup
    pipe = W2WEditPipeline(**{k: sd.components[k] for k in COMPONENTS}, weight_space=space)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(seed=3, num_inference_steps=3, height=32, width=32, guidance_scale=5.0)
    out = pipe("a portrait", lora=loras[1], direction=direction, strengths=[-2.0, 0.0, 3.0], **kwargs)
    assert len(out.images) == 3 and out.strengths == [-2.0, 0.0, 3.0]
    assert out.grid.size == (96, 32 + 12)
    arrays = [np.asarray(im, dtype=np.float32) for im in out.images]
    assert np.abs(arrays[0] - arrays[1]).mean() > 0 and np.abs(arrays[2] - arrays[1]).mean() > 0

    # α = 0 equals plain Stable Diffusion with the reduced LoRA loaded by diffusers, same seed
    reference = _plain_image(sd, space.edit(loras[1], direction, 0.0), "a portrait", seed=3, steps=3)
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(out.images[1]))

    # delayed injection: a threshold above every timestep edits throughout, 0 never injects the edit
    always = pipe(
        "a portrait", lora=loras[1], direction=direction, strengths=[3.0], injection_timestep=10_000, **kwargs
    )
    never = pipe("a portrait", lora=loras[1], direction=direction, strengths=[3.0], injection_timestep=0, **kwargs)
    np.testing.assert_array_equal(np.asarray(always.images[0]), arrays[2])
    np.testing.assert_array_equal(np.asarray(never.images[0]), arrays[1])
    assert not any(pipe.get_list_adapters().values())


def test_pipeline_save_and_from_pretrained(setup, tmp_path):
    sd, space, loras, direction = setup
    pipe = W2WEditPipeline(**{k: sd.components[k] for k in COMPONENTS}, weight_space=space)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = W2WEditPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.weight_space, WeightSpace)
    torch.testing.assert_close(loaded.weight_space.components, space.components)
    assert loaded.weight_space.config.module_names == space.config.module_names
    kwargs = dict(
        lora=loras[2], direction=direction, strengths=[1.0], seed=0, num_inference_steps=2, height=32, width=32
    )
    pipe.set_progress_bar_config(disable=True)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        np.asarray(pipe("x", **kwargs).images[0]), np.asarray(loaded("x", **kwargs).images[0])
    )


def test_sdxl_pipeline_matches_plain_sdxl_at_zero_strength():
    from imagegem_hf.w2w import W2WEditXLPipeline

    xl = tiny_sd_pipeline(seed=0, sdxl=True)
    shapes = lora_target_shapes(xl.unet, ATTENTION_TARGETS)
    for encoder in ("text_encoder", "text_encoder_2"):
        shapes |= lora_target_shapes(getattr(xl, encoder), ["q_proj", "v_proj"], prefix=encoder)
    loras, labels, _ = synthetic_loras(shapes, n=10, seed=4)
    space = WeightSpace.build(loras, n_components=4, show_progress=False)
    direction = preference_direction(space, None, labels, test_fraction=0)
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    pipe = W2WEditXLPipeline(**{k: xl.components[k] for k in names}, weight_space=space)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a cat",
        lora=loras[0],
        direction=direction,
        strengths=[0.0, 3.0],
        seed=1,
        num_inference_steps=2,
        height=32,
        width=32,
    )
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    assert np.abs(np.asarray(out.images[0], np.float32) - np.asarray(out.images[1], np.float32)).mean() > 0
    reference = _plain_image(xl, space.edit(loras[0], direction, 0.0), "a cat", seed=1, steps=2)
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(out.images[0]))
    # delayed injection with precomputed (pooled) embeddings of both text encoders: a threshold above every
    # timestep edits throughout, 0 never
    kwargs = dict(
        lora=loras[0], direction=direction, strengths=[3.0], seed=1, num_inference_steps=2, height=32, width=32
    )
    always, never = (pipe("a cat", injection_timestep=t, **kwargs).images[0] for t in (10_000, 0))
    np.testing.assert_array_equal(np.asarray(always), np.asarray(out.images[1]))
    np.testing.assert_array_equal(np.asarray(never), np.asarray(out.images[0]))


def _merged(model: torch.nn.Module, lora, component: str) -> torch.nn.Module:
    """A copy of `model` with W + ΔW of the LoRA's `component.` modules added by hand."""
    merged = copy.deepcopy(model)
    layers = dict(merged.named_modules())
    with torch.no_grad():
        for name, module in lora.modules.items():
            if name.startswith(component + "."):
                layers[name.removeprefix(component + ".")].weight += module.delta_weight().reshape(
                    layers[name.removeprefix(component + ".")].weight.shape
                )
    return merged


def _delayed_injection_reference(sd, base, edited, prompt, seed, steps, threshold, guidance):
    """Delayed injection re-typed as a plain DDIM loop on hand-merged copies of the UNet and text encoder: the edited
    weights (and the edited text embeddings) for t ≤ threshold, the unedited ones before."""
    from diffusers import DDIMScheduler

    def embed(text_encoder, text):
        ids = sd.tokenizer(
            [text],
            padding="max_length",
            max_length=sd.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return text_encoder(ids)[0]

    models = {}
    for key, lora in (("base", base), ("edit", edited)):
        text_encoder = _merged(sd.text_encoder, lora, "text_encoder")
        models[key] = (
            _merged(sd.unet, lora, "unet"),
            torch.cat([embed(text_encoder, ""), embed(text_encoder, prompt)]),
        )
    scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(steps)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            unet, context = models["edit" if t <= threshold else "base"]
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        image = sd.vae.decode(latents / sd.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("with_text_encoder", [False, True], ids=["unet", "unet+text_encoder"])
def test_delayed_injection_matches_a_retyped_loop(with_text_encoder):
    """The edited LoRA, text-encoder modules included, is used from the first step with t ≤ threshold."""
    sd = tiny_sd_pipeline(seed=0)
    shapes = lora_target_shapes(sd.unet, ATTENTION_TARGETS)
    if with_text_encoder:
        shapes |= lora_target_shapes(sd.text_encoder, ["q_proj", "v_proj"], prefix="text_encoder")
    loras, labels, _ = synthetic_loras(shapes, n=12, seed=6)
    space = WeightSpace.build(loras, n_components=4, show_progress=False)
    direction = preference_direction(space, None, labels, test_fraction=0)
    pipe = W2WEditPipeline(**{k: sd.components[k] for k in COMPONENTS}, weight_space=space)
    pipe.set_progress_bar_config(disable=True)
    steps, strength = 4, 30.0
    sd.scheduler.set_timesteps(steps)
    threshold = int(sd.scheduler.timesteps[1])  # exactly the second step's timestep: edited from step 2 on
    kwargs = dict(seed=7, num_inference_steps=steps, height=32, width=32, guidance_scale=5.0)
    out = pipe(
        "a red cat", lora=loras[0], direction=direction, strengths=[strength], injection_timestep=threshold, **kwargs
    )
    base, edited = space.edit(loras[0], direction, 0.0), space.edit(loras[0], direction, strength)
    reference = _delayed_injection_reference(sd, base, edited, "a red cat", 7, steps, threshold, 5.0)
    got = np.asarray(out.images[0]).astype(np.int16)
    assert np.abs(got - reference).max() <= 1 and np.abs(got - reference).mean() < 0.05
    # the check can tell the rules apart: edited from step 3 on (t < threshold), or without text-encoder edits
    later = _delayed_injection_reference(sd, base, edited, "a red cat", 7, steps, threshold - 1, 5.0)
    assert np.abs(later.astype(np.int16) - reference).mean() > 1
    if with_text_encoder:
        unet_only = copy.deepcopy(edited)
        unet_only.modules = {k: v for k, v in edited.modules.items() if k.startswith("unet.")}
        unet_only.modules |= {k: v for k, v in base.modules.items() if not k.startswith("unet.")}
        without = _delayed_injection_reference(sd, base, unet_only, "a red cat", 7, steps, threshold, 5.0)
        assert np.abs(without.astype(np.int16) - reference).mean() > 1
