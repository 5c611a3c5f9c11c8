"""Demo stage `w2w`, in the toy world: user-made LoRAs fine-tuned from the toy base, a weight space over them, a
warmth direction learnt from the measured warmth of their samples and debiased against brightness, and edits of
held-out LoRAs: a strength grid with the measured attributes under each image, and both attributes against α for
the raw and the debiased direction.

`synthetic_loras` (used by the tests and `examples/w2w_personalize.py`) makes LoRAs with a planted direction on any
layout: rank-4 factorisations (arbitrary gauge, alpha ≠ rank) of rank-1 updates scattered around a shared LoRA,
shifted by ±`planted_strength` along a hidden unit direction according to their label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imagegem_hf.w2w.lora_io import LoRA, LoRAModule

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEMO_LORAS = 24
# A grade tints multiplicatively (R × (1 + 0.4 w)), so it shows on a light background: on the dark one the grid's
# warmth moved +0.02 → +0.07 across the strengths.
GRID_PROMPT = "a circle on a light background"


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
    from imagegem_hf.toy import captioned_grid, load_toy_pipeline
    from imagegem_hf.toy.loras import ToyLoRAConfig, style_measures
    from imagegem_hf.toy.w2w_edits import W2WToyConfig, plot_attribute_vs_strength, run_w2w_effect
    from imagegem_hf.w2w.pipeline_w2w import W2WEditPipeline

    out: Path = context.stage_dir("w2w")
    pipe = load_toy_pipeline()
    config = W2WToyConfig(
        loras=ToyLoRAConfig(n_loras=DEMO_LORAS, seed=context.seed),
        n_held_out=4,
        n_components=12,
        label_seeds=2,
        eval_seeds=1,
        n_strengths=7,
    )
    effect = run_w2w_effect(pipe, None, config, show_progress=True)
    effect.space.save_pretrained(out / "space")
    for key in ("raw", "debiased"):
        effect.directions[key].save(out / f"direction_{key}.safetensors")
    curves = plot_attribute_vs_strength(effect, config.attribute, config.other, out / "w2w_attribute_vs_alpha.png")

    editor = W2WEditPipeline(
        **{k: pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        weight_space=effect.space,
    )
    editor.set_progress_bar_config(disable=True)
    editor.save_pretrained(out / "pipeline")
    rows, labels, captions = [], [], []
    for user in effect.held_out[:2]:
        for key in ("raw", "debiased"):
            result = editor(
                GRID_PROMPT,
                lora=effect.files[user],
                direction=effect.directions[key],
                strengths=[float(a) for a in effect.strengths],
                seed=context.seed,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
            )
            measured = style_measures(result.images)
            rows.append(result.images)
            labels.append(f"user {user} {key}")
            pairs = zip(measured["warmth"], measured["brightness"], strict=True)
            captions.append([f"w{w:+.2f} b{b:.2f}" for w, b in pairs])
    titles = [f"a={a:+.2f}" for a in effect.strengths]
    grid_path = out / "w2w_strength_grid.png"
    captioned_grid(rows, labels, captions=captions, column_titles=titles).save(grid_path)
    spearman, slopes = (
        effect.spearman("raw", config.attribute),
        {key: effect.slope(key, config.other) for key in ("raw", "debiased")},
    )
    with open(out / "summary.txt", "w", encoding="utf-8") as handle:
        handle.write(f"{config.attribute}_spearman_raw {spearman:.4f}\n")
        for key, slope in slopes.items():
            handle.write(f"{config.other}_per_alpha_{key} {slope:.5f}\n")
    return [
        f"{len(effect.files)} toy user LoRAs (kohya, ranks 1–16) → {effect.files[0].parent}",
        f"weight space over {effect.space.config.n_models} of them, m = {effect.space.n_components} → {out / 'space'}",
        f"{config.attribute} vs α: Spearman {spearman:.2f}; {config.other} per unit α: raw {slopes['raw']:+.4f}, "
        f"debiased {slopes['debiased']:+.4f} → {curves}",
        f"strength grid (measured warmth w and brightness b under each image) → {grid_path}",
        f"edit pipeline (toy SD + weight space, with its code) → {out / 'pipeline'}",
    ]
