"""Demo stage `w2w`: a LoRA weight space over synthetic LoRAs of the tiny UNet, a planted direction learnt back
from labels, a LoRA edited along it, reloaded with diffusers' `load_lora_weights`, and a strength grid PNG.

The synthetic LoRAs are rank-4 factorisations (arbitrary gauge, alpha ≠ rank, mixed kohya/diffusers files) of
rank-1 updates scattered around a shared LoRA, shifted by ±`planted_strength` along a hidden unit direction
according to their label. Recovering that direction from the labels alone checks the whole path: reading,
rank-1 reduction, the streaming PCA and the classifier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imagegem_hf.w2w.lora_io import LoRA, LoRAModule, lora_target_shapes, save_lora

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def synthetic_loras(
    shapes: dict[str, tuple[int, int, tuple[int, ...]]],
    n: int,
    seed: int = 0,
    rank: int = 4,
    planted_strength: float = 1.0,
    noise: float = 0.05,
) -> tuple[list[LoRA], np.ndarray, np.ndarray]:
    """`n` LoRAs with binary labels and the unit direction (in `WeightSpace` rank-1 layout) that separates them.

    Args:
        shapes: Layout `{name: (out_features, in_features, kernel_size)}` (e.g. from `lora_target_shapes`).
        n: Number of LoRAs (half labelled +1).
        seed: Seed of everything.
        rank: Rank of the stored factors (the rank-1 update is padded with components that cancel out).
        planted_strength: Shift ±strength along the planted direction by label.
        noise: Per-coordinate standard deviation of the LoRA-to-LoRA variation.

    Returns:
        `(loras, labels, planted)`: the LoRAs, labels in {−1, +1}, and the planted unit vector (per module, sorted
        by name: down then up).

    Example:
        ```python
        >>> from imagegem_hf.testing import tiny_sd_components
        >>> from imagegem_hf.w2w.demo import synthetic_loras
        >>> from imagegem_hf.w2w.lora_io import lora_target_shapes
        >>> shapes = lora_target_shapes(tiny_sd_components()["unet"], ["to_q", "to_v"])
        >>> loras, labels, planted = synthetic_loras(shapes, n=8)
        >>> len(loras), labels.shape
        (8, (8,))
        ```
    """
    rng = np.random.default_rng(seed)
    names = sorted(shapes)
    base, offsets = [], {}
    for name in names:
        n_out, n_in, _ = shapes[name]
        down, up = rng.normal(size=n_in), rng.normal(size=n_out)
        up[np.argmax(np.abs(up))] = 3.0  # a clearly dominant positive entry fixes the sign convention
        offsets[name] = (sum(len(b) for b in base), n_in, n_out)
        base += [down / np.linalg.norm(down), up / np.linalg.norm(up)]
    base_vector = np.concatenate(base)
    planted = rng.normal(size=base_vector.shape[0])
    planted /= np.linalg.norm(planted)
    labels = rng.permutation(np.array([1] * (n // 2) + [-1] * (n - n // 2)))
    loras = []
    for label in labels:
        vector = base_vector + noise * rng.normal(size=base_vector.shape[0]) + label * planted_strength * planted
        modules = {}
        for name in names:
            start, n_in, n_out = offsets[name]
            kernel = shapes[name][2]
            gauge = float(np.exp(0.3 * rng.normal()))
            down = np.zeros((rank, n_in))
            up = np.zeros((n_out, rank))
            down[0] = vector[start : start + n_in] / gauge
            up[:, 0] = 2.0 * vector[start + n_in : start + n_in + n_out] * gauge  # alpha = rank / 2 halves it
            up[:, 1:] = rng.normal(size=(n_out, rank - 1))  # cancelled by zero rows of down
            down_t = torch.tensor(down, dtype=torch.float32)
            up_t = torch.tensor(up, dtype=torch.float32)
            if kernel:
                down_t = down_t.reshape(rank, n_in // int(np.prod(kernel)), *kernel)
                up_t = up_t.reshape(n_out, rank, 1, 1)
            modules[name] = LoRAModule(down=down_t, up=up_t, alpha=rank / 2)
        loras.append(LoRA(modules))
    return loras, labels, planted


def run_demo(context) -> list[str]:
    from imagegem_hf.testing import tiny_sd_pipeline
    from imagegem_hf.w2w.directions import preference_direction
    from imagegem_hf.w2w.pipeline_w2w import W2WEditPipeline
    from imagegem_hf.w2w.space import WeightSpace

    out: Path = context.stage_dir("w2w")
    sd = tiny_sd_pipeline(seed=context.seed)
    shapes = lora_target_shapes(sd.unet, ATTENTION_TARGETS)
    loras, labels, planted = synthetic_loras(shapes, n=48, seed=context.seed, planted_strength=1.0)
    paths = [
        save_lora(lora, out / "loras" / f"lora_{i:03d}.safetensors", format="kohya" if i % 2 else "diffusers")
        for i, lora in enumerate(loras)
    ]
    space = WeightSpace.build(paths, n_components=16)
    space.save_pretrained(out / "space")
    direction = preference_direction(space, None, labels, method="logistic", name="planted")
    direction.save(out / "direction_planted.safetensors")
    cosine = abs(float(direction.vector @ planted))
    print(
        f"W2W space: {len(paths)} LoRAs, {len(shapes)} modules, vector length {space.vector_length}, "
        f"{space.n_components} components; planted direction recovered with |cos| = {cosine:.3f}, "
        f"held-out accuracy {direction.accuracy:.2f}"
    )
    user = int(np.flatnonzero(labels == -1)[0])
    edited_path = save_lora(space.edit(paths[user], direction, 2.0), out / "edited_lora.safetensors")
    sd.load_lora_weights(str(edited_path))  # written by us, read back by diffusers
    sd.unload_lora_weights()
    components = {k: sd.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = W2WEditPipeline(**components, weight_space=space)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        "a portrait photo",
        lora=paths[user],
        direction=direction,
        strengths=[-2.0, 0.0, 2.0, 4.0],
        seed=context.seed,
        num_inference_steps=4,
        height=32,
        width=32,
    )
    grid_path = out / "w2w_grid.png"
    result.grid.resize((result.grid.width * 4, result.grid.height * 4), resample=0).save(grid_path)
    with open(out / "summary.txt", "w", encoding="utf-8") as handle:
        handle.write(f"planted_direction_cosine {cosine:.4f}\nheld_out_accuracy {direction.accuracy:.4f}\n")
    return [
        f"weight space ({len(paths)} synthetic LoRAs, m = {space.n_components}) → {out / 'space'}",
        f"planted direction recovered, |cos| = {cosine:.3f} → {out / 'direction_planted.safetensors'}",
        f"edited LoRA (α = 2, loads with load_lora_weights) → {edited_path}",
        f"strength grid (α = −2, 0, 2, 4) → {grid_path}",
    ]
