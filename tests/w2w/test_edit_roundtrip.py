"""Edited LoRAs round-trip: a saved edit projects back to its own coefficients, and +α, save, load, −α gives back
the ΔW of the unedited (rank-1 reduced) LoRA; files without the weight-space mark are canonicalised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegem_hf.testing import tiny_sd_components
from imagegem_hf.w2w import (
    LoRA,
    LoRAModule,
    WeightSpace,
    load_lora,
    lora_target_shapes,
    preference_direction,
    save_lora,
)
from imagegem_hf.w2w.demo import synthetic_loras
from imagegem_hf.w2w.lora_io import W2W_GAUGE_KEY


@pytest.fixture(scope="module", params=[False, True], ids=["sign_rule", "aligned_signs"])
def setup(request):
    shapes = lora_target_shapes(tiny_sd_components(seed=0)["unet"], ["to_q", "to_k", "to_v", "to_out.0"])
    loras, labels, _ = synthetic_loras(shapes, n=24, seed=5, noise=0.2)
    space = WeightSpace.build(loras, n_components=8, show_progress=False, align_signs=request.param)
    direction = preference_direction(space, None, labels, test_fraction=0)
    return space, loras, direction


def _coefficients(space: WeightSpace, vector: np.ndarray) -> np.ndarray:
    """((θ − μ) / σ) · Vᵀ written out on the space's buffers, in float64."""
    mean, std = space.mean.double().numpy(), space.std.double().numpy()
    return ((vector.astype(np.float64) - mean) / std) @ space.components.double().numpy().T


def _top1_delta(module: LoRAModule) -> torch.Tensor:
    """The best rank-1 approximation of the module's ΔW from a dense SVD (independent of the reduction code)."""
    u, s, vh = torch.linalg.svd(module.delta_weight().double(), full_matrices=False)
    return s[0] * torch.outer(u[:, 0], vh[0])


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_saved_edit_loads_back_to_its_coefficients(setup, tmp_path, format):
    space, loras, direction = setup
    theta = space.vectorize(loras[0])[0]
    alpha = 3.0
    expected = _coefficients(space, theta + alpha * direction.vector)
    edited = space.edit(loras[0], direction, alpha)
    path = save_lora(edited, tmp_path / f"edited_{format}.safetensors", format=format)
    for item in (edited, path, load_lora(path)):
        got = space.project(item)
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected)


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_edit_save_load_unedit_gives_back_the_original_delta_w(setup, tmp_path, format):
    space, loras, direction = setup
    # a LoRA from elsewhere (rank 4, alpha ≠ rank): "original" is its rank-1 reduction, what strength 0 gives
    foreign = save_lora(loras[1], tmp_path / "foreign.safetensors", format=format)
    # a rank-1 LoRA the library wrote (a point of the space): its ΔW is exactly the original
    ours = save_lora(space.to_lora(space.training_coefficients()[2]), tmp_path / "ours.safetensors", format=format)
    for source in (foreign, ours):
        original = load_lora(source)
        edited = save_lora(space.edit(source, direction, 3.0), tmp_path / "plus.safetensors", format=format)
        restored = space.edit(edited, direction, -3.0)
        for name, module in original.modules.items():
            delta = restored.modules[name].delta_weight().double()
            reference = _top1_delta(module)
            torch.testing.assert_close(delta, reference, atol=1e-5 * float(reference.abs().max()), rtol=0)


@pytest.mark.parametrize("align_signs", [True, False])
def test_unmarked_files_are_canonicalised(setup, tmp_path, align_signs):
    _, loras, _ = setup
    space = WeightSpace.build(loras, n_components=8, show_progress=False, align_signs=align_signs)
    rng = np.random.default_rng(0)
    modules = {}
    for name, n_out, n_in, _, _ in space.layout:  # rank 1, |up| ≠ |down|, and the largest entry of up negative
        down, up = rng.normal(size=(1, n_in)), rng.normal(size=(n_out, 1))
        up[np.abs(up).argmax()] = -3 * np.abs(up).max()
        modules[name] = LoRAModule(down=torch.tensor(4 * down, dtype=torch.float32), up=torch.tensor(up / 4).float())
    unmarked = save_lora(LoRA(modules), tmp_path / "unmarked.safetensors")
    vector = space.vectorize(load_lora(unmarked))[0]
    for (_, n_out, n_in, _, offset), module in zip(space.layout, modules.values(), strict=True):
        down, up = vector[offset : offset + n_in], vector[offset + n_in : offset + n_in + n_out]
        assert np.isclose(np.linalg.norm(down), np.linalg.norm(up), rtol=1e-5)  # √s on each side
        if align_signs:  # the component points along the space's sign reference
            assert float(np.r_[down, up] @ space.sign_reference.numpy()[offset : offset + n_in + n_out]) > 0
        else:
            assert up[np.abs(up).argmax()] > 0  # the reduction's sign rule
        torch.testing.assert_close(
            torch.outer(torch.from_numpy(up), torch.from_numpy(down)), module.delta_weight(), atol=1e-5, rtol=1e-5
        )
    marked = LoRA(modules, metadata={W2W_GAUGE_KEY: "weight_space_vector"})
    kept = space.vectorize(load_lora(save_lora(marked, tmp_path / "marked.safetensors")))[0]
    first, n_out, n_in, _, offset = space.layout[0]
    np.testing.assert_array_equal(kept[offset : offset + n_in], modules[first].down.reshape(-1).numpy())
