"""Weights2Weights in the toy world, measured: a weight space over user LoRAs, a direction, and what edits do.

The toy users' LoRAs (`imagegem_hf.toy.loras`) are labelled by the measured attribute of their own samples
(`attribute_labels`, the role `style_labels` plays with CLIP), a `WeightSpace` is built over most of them, a
direction is learnt for the edited attribute (warmth by default) and for the other one (brightness), and the
edited attribute's direction is debiased against the other's. Held-out LoRAs are then edited at a grid of strengths
along the raw and the debiased direction, and both attributes are measured on images generated with the same
prompts and seeds at every strength. The benchmark, the slow test and the demo all run `run_w2w_effect`.

Images are generated at guidance 2: guidance amplifies what the prompt asks for, which a colour grade is not. Over
24 user LoRAs, the Spearman correlation between a user's warmth and the measured warmth of their samples is 0.36 at
guidance 4, 0.69 at 2 and 0.89 at 1 (brightness: 0.80, 0.73, 0.35; whole-image means, before `style_measures` read
the background), so at 2 both attributes label the LoRAs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagegem_hf.toy.loras import (
    STYLE_ATTRIBUTES,
    ToyLoRAConfig,
    generate_with_loras,
    style_measures,
    user_lora_collection,
)
from imagegem_hf.w2w.directions import Direction, debias, preference_direction
from imagegem_hf.w2w.labels import attribute_labels
from imagegem_hf.w2w.lora_io import LoRA, load_lora
from imagegem_hf.w2w.space import WeightSpace

PROMPTS = (
    "a circle on a dark background",
    "a square on a light background",
    "a red triangle on a light background",
    "a blue shape on a dark background",
)


@dataclass
class W2WToyConfig:
    """The toy W2W experiment (the defaults are the benchmark's).

    Example:
        ```python
        >>> from imagegem_hf.toy.w2w_edits import W2WToyConfig
        >>> W2WToyConfig().n_strengths
        9
        ```
    """

    loras: ToyLoRAConfig = field(default_factory=ToyLoRAConfig, metadata={"help": "The user LoRA population."})
    attribute: str = field(default="warmth", metadata={"help": "The attribute the direction edits."})
    other: str = field(default="brightness", metadata={"help": "The attribute the direction is debiased against."})
    n_held_out: int = field(default=12, metadata={"help": "LoRAs left out of the space and edited."})
    n_components: int = field(
        default=12,
        metadata={
            "help": "Principal components of the weight space (over 52 LoRAs, 24 left the brightness classifier at "
            "0.73 held-out accuracy and debiasing shrank brightness's slope 1.3×; 12: 0.91 and 3.6–3.8×)."
        },
    )
    align_signs: bool = field(
        default=False,
        metadata={
            "help": "Fix the LoRAs' component signs by the population (`WeightSpace.build(align_signs=True)`) "
            "instead of each LoRA's own rule (README, W2W)."
        },
    )
    in_subspace: bool = field(
        default=False,
        metadata={
            "help": "Edit each held-out LoRA's PCA reconstruction, as weights2weights does (`WeightSpace.edit`). "
            "Debiasing then shrank brightness's slope 9.4×, 2.2× and 1.4× on populations 0–2 (14.3×, 0.62×, 0.96× "
            "without; README)."
        },
    )
    prompts: tuple[str, ...] = field(default=PROMPTS, metadata={"help": "Prompts of every measurement."})
    label_seeds: int = field(default=4, metadata={"help": "Seeds per prompt of the samples that label a LoRA."})
    eval_seeds: int = field(default=2, metadata={"help": "Seeds per prompt of each edited LoRA's images."})
    n_strengths: int = field(default=9, metadata={"help": "Edit strengths, evenly spaced and symmetric around 0."})
    strength_span: float = field(
        default=3.0, metadata={"help": "Largest |α|, in standard deviations of the LoRAs along the raw direction."}
    )
    num_inference_steps: int = field(default=10, metadata={"help": "DDIM steps of every image."})
    guidance_scale: float = field(
        default=2.0,
        metadata={"help": "Classifier-free guidance of every image (stronger guidance hides colour grades)."},
    )


def small_config() -> W2WToyConfig:
    """The experiment at a smaller size (40 LoRAs, 8 held out, 7 strengths): the slow test's, and
    `benchmarks/learn_w2w.py --small`. (With 24 LoRAs, 18 in the space, the debiased direction's warmth curve was
    not monotone: Spearman 0.54.)"""
    return W2WToyConfig(
        loras=ToyLoRAConfig(n_loras=40), n_held_out=8, n_components=12, label_seeds=2, eval_seeds=1, n_strengths=7
    )


@dataclass
class W2WToyEffect:
    """What the edits did, per direction (`"raw"`, `"debiased"`, `"shuffled"`: `uninformative_labels`, the control).

    Attributes:
        strengths: The α grid (weight-space norm; directions are unit vectors).
        curves: `{direction: {attribute: mean measured value per strength}}` over held-out LoRAs, prompts, seeds.
        errors: Standard errors of those means over the held-out LoRAs.
        directions: The learnt `Direction`s (`"raw"`, `"other"`, `"debiased"`, `"shuffled"`).
        space: The weight space.
        label_scores: `{attribute: mean measured value of each LoRA's samples}` (all LoRAs, file order).
        held_out: Indices of the edited LoRAs.
        files: The user LoRA files (kohya), indexed like `label_scores`.
    """

    strengths: np.ndarray
    curves: dict[str, dict[str, np.ndarray]]
    errors: dict[str, dict[str, np.ndarray]]
    directions: dict[str, Direction]
    space: WeightSpace
    label_scores: dict[str, np.ndarray]
    held_out: list[int]
    files: list[Path]

    def spearman(self, direction: str, attribute: str) -> float:
        from scipy.stats import spearmanr

        return float(spearmanr(self.strengths, self.curves[direction][attribute]).statistic)

    def slope(self, direction: str, attribute: str, span: float = 1.0) -> float:
        """Least-squares change of the attribute per unit α, over the strengths with |α| ≤ `span` × the largest."""
        inner = np.abs(self.strengths) <= span * np.abs(self.strengths).max() + 1e-9
        return float(np.polyfit(self.strengths[inner], self.curves[direction][attribute][inner], 1)[0])


def measure_loras(
    pipe, loras: list[LoRA], config: W2WToyConfig, seeds: int, seed_offset: int = 0, show_progress: bool = True
) -> dict[str, np.ndarray]:
    """`{attribute: (n_loras, prompts × seeds)}` measured on images of every LoRA, same prompts and seeds for all."""
    jobs = [(p, seed_offset + s) for p in config.prompts for s in range(seeds)]
    images = generate_with_loras(
        pipe,
        loras,
        [k for k in range(len(loras)) for _ in jobs],
        [p for _ in loras for p, _ in jobs],
        [s for _ in loras for _, s in jobs],
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        show_progress=show_progress,
    )
    return {name: values.reshape(len(loras), len(jobs)) for name, values in style_measures(images).items()}


def run_w2w_effect(
    pipe, cache_dir: str | os.PathLike | None = None, config: W2WToyConfig | None = None, show_progress: bool = True
) -> W2WToyEffect:
    """Train (or reuse) the user LoRAs, build the space, learn and debias the direction, edit held-out LoRAs.

    Args:
        pipe: The toy base `StableDiffusionPipeline`.
        cache_dir: Where the user LoRAs are kept (default: `user_lora_collection`'s cache folder).
        config: A `W2WToyConfig`.
        show_progress: tqdm bars.

    Returns:
        A `W2WToyEffect`.

    Example:
        ```python
        >>> from imagegem_hf.toy import load_toy_pipeline
        >>> from imagegem_hf.toy.w2w_edits import run_w2w_effect
        >>> effect = run_w2w_effect(load_toy_pipeline())  # doctest: +SKIP
        >>> effect.spearman("raw", "warmth") > 0.9  # doctest: +SKIP
        True
        ```
    """
    config = config or W2WToyConfig()
    collection = user_lora_collection(pipe, cache_dir, config.loras, show_progress)
    files = collection.files
    loras = [load_lora(f) for f in files]  # read back as any user of the files would
    scores = measure_loras(pipe, loras, config, config.label_seeds, show_progress=show_progress)
    label_scores = {name: values.mean(axis=1) for name, values in scores.items()}
    order = np.random.default_rng(config.loras.seed).permutation(len(files))
    held_out, train = sorted(order[: config.n_held_out].tolist()), sorted(order[config.n_held_out :].tolist())
    space = WeightSpace.build(
        [files[i] for i in train],
        n_components=config.n_components,
        show_progress=show_progress,
        align_signs=config.align_signs,
    )
    directions = learn_directions(space, {name: values[train] for name, values in label_scores.items()}, config)
    raw = directions["raw"]
    # the LoRAs' spread along the raw direction, in α units (a unit step moves the coefficients by normal / norm)
    spread = float(np.std(space.training_coefficients() @ raw.normal) * _coefficient_norm(space, raw))
    strengths = np.linspace(-config.strength_span, config.strength_span, config.n_strengths) * spread
    curves: dict[str, dict[str, np.ndarray]] = {}
    errors: dict[str, dict[str, np.ndarray]] = {}
    for key in ("raw", "debiased", "shuffled"):
        edited = edit_at_strengths(space, [files[i] for i in held_out], directions[key], strengths, config)
        measured = measure_loras(
            pipe, edited, config, config.eval_seeds, seed_offset=1000, show_progress=show_progress
        )
        curves[key], errors[key] = {}, {}
        for name, values in measured.items():
            per_lora = values.mean(axis=1).reshape(len(strengths), len(held_out))
            curves[key][name] = per_lora.mean(axis=1)
            errors[key][name] = per_lora.std(axis=1, ddof=1) / np.sqrt(len(held_out))
    return W2WToyEffect(strengths, curves, errors, directions, space, label_scores, held_out, files)


def edit_at_strengths(
    space: WeightSpace, loras: list, direction: Direction, strengths: np.ndarray, config: W2WToyConfig
) -> list[LoRA]:
    """Every LoRA edited at every strength, strength-major (`[α₀: all LoRAs, α₁: all LoRAs, …]`); with
    `config.in_subspace` the edits start from each LoRA's PCA reconstruction instead of the LoRA itself.

    Example:
        ```python
        >>> edited = edit_at_strengths(space, files, direction, np.linspace(-3, 3, 7), config)  # doctest: +SKIP
        >>> len(edited) == 7 * len(files)  # doctest: +SKIP
        True
        ```
    """
    return [
        space.edit(lora, direction, float(alpha), in_subspace=config.in_subspace)
        for alpha in strengths
        for lora in loras
    ]


def learn_directions(
    space: WeightSpace, label_scores: dict[str, np.ndarray], config: W2WToyConfig
) -> dict[str, Direction]:
    """The experiment's directions from the measured attributes of the LoRAs the space was built from.

    Each attribute is split at its median (`attribute_labels`); with an odd number of LoRAs the middle one is left
    unlabelled and out of that attribute's fit.

    Args:
        space: The weight space.
        label_scores: `{attribute: mean measured value per LoRA}`, in the order of `space.training_coefficients()`.
        config: Which attribute is edited (`config.attribute`) and which is kept (`config.other`).

    Returns:
        `{"raw", "other", "debiased", "shuffled"}`: the edited attribute's direction, the other's, the first
        debiased against the second, and the control learnt from `uninformative_labels`.

    Example:
        ```python
        >>> directions = learn_directions(space, {"warmth": w, "brightness": b}, W2WToyConfig())  # doctest: +SKIP
        >>> sorted(directions)  # doctest: +SKIP
        ['debiased', 'other', 'raw', 'shuffled']
        ```
    """
    coefficients = space.training_coefficients()
    fits = {}
    for name in (config.attribute, config.other):
        scores = np.asarray(label_scores[name])
        if len(scores) != len(coefficients):
            raise ValueError(f"Got {len(scores)} {name} scores for a space over {len(coefficients)} LoRAs.")
        labelled = attribute_labels(dict(enumerate(scores.tolist())))
        rows = sorted(labelled)
        fits[name] = (coefficients[rows], np.array([labelled[r] for r in rows]))
    x, y = fits[config.attribute]
    raw = preference_direction(space, x, y, name=config.attribute)
    other = preference_direction(space, *fits[config.other], name=config.other)
    shuffled = preference_direction(space, x, uninformative_labels(y, config.loras.seed + 1), name="shuffled")
    return {"raw": raw, "other": other, "debiased": debias(space, raw, [other]), "shuffled": shuffled}


def held_out_style_r2(
    files: list[Path], styles: np.ndarray, n_components: int, align_signs: bool, folds: int = 4, seed: int = 0
) -> dict[str, float]:
    """How linearly a weight space holds the users' true styles: `{attribute: R²}` of least-squares predictions of
    held-out LoRAs' styles from their coefficients (`folds`-fold, pooled), each fold's space built over the rest.

    Args:
        files: The user LoRA files.
        styles: `(len(files), 2)` true styles, columns in `STYLE_ATTRIBUTES` order.
        n_components: Principal components of each space.
        align_signs: `WeightSpace.build(align_signs=...)`.
        folds: Folds of the split.
        seed: Seed of the split.

    Example:
        ```python
        >>> held_out_style_r2(collection.files, styles, 12, align_signs=True)  # doctest: +SKIP
        {'warmth': 0.91, 'brightness': 0.73}
        ```
    """
    order = np.random.default_rng(seed).permutation(len(files))
    predictions = np.zeros_like(styles)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        space = WeightSpace.build(
            [files[i] for i in train], n_components=n_components, show_progress=False, align_signs=align_signs
        )
        design = np.c_[space.training_coefficients(), np.ones(len(train))]
        weights = np.linalg.lstsq(design, styles[train], rcond=None)[0]
        predictions[fold] = np.c_[space.project([files[i] for i in fold]), np.ones(len(fold))] @ weights
    residual = ((predictions - styles) ** 2).sum(axis=0)
    total = ((styles - styles.mean(axis=0)) ** 2).sum(axis=0)
    return {name: float(r2) for name, r2 in zip(STYLE_ATTRIBUTES, 1.0 - residual / total, strict=True)}


def uninformative_labels(labels: np.ndarray, seed: int) -> np.ndarray:
    """±1 labels re-drawn so that they agree with `labels` on half of each class (rounded down): the control.

    A plain permutation of 40 labels agrees with the originals on 50 ± 8% of them, and a lucky one leaves the
    control a real, weaker warmth direction (at 40 LoRAs: held-out accuracy 0.71 and Spearman 1.0 with α).

    Example:
        ```python
        >>> import numpy as np
        >>> from imagegem_hf.toy.w2w_edits import uninformative_labels
        >>> y = np.array([1, 1, 1, 1, -1, -1, -1, -1])
        >>> z = uninformative_labels(y, seed=0)
        >>> int((z == 1).sum()), int((z == y).sum())
        (4, 4)
        ```
    """
    rng = np.random.default_rng(seed)
    out = np.asarray(labels).copy()
    positives, negatives = np.flatnonzero(out == 1), np.flatnonzero(out == -1)
    n = min(len(positives), len(negatives)) // 2
    out[rng.choice(positives, n, replace=False)] = -1
    out[rng.choice(negatives, n, replace=False)] = 1
    return out


def _coefficient_norm(space: WeightSpace, direction: Direction) -> float:
    """|(normal · V) · σ|: a unit step along `direction.vector` moves the coefficients by normal / this."""
    components, std = space.components.double().numpy(), space.std.double().numpy()
    return float(np.linalg.norm((direction.normal.astype(np.float64) @ components) * std))


def plot_attribute_vs_strength(effect: W2WToyEffect, attribute: str, other: str, path: str | os.PathLike) -> Path:
    """Both attributes against α for the raw, debiased and shuffled-label directions (mean ± s.e. over held-out
    LoRAs), as a PNG.

    Example:
        ```python
        >>> plot_attribute_vs_strength(effect, "warmth", "brightness", "w2w_attribute_vs_alpha.png")  # doctest: +SKIP
        ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"raw": ("tab:red", "raw direction"), "debiased": ("tab:blue", f"debiased against {other}")}
    styles["shuffled"] = ("tab:gray", "shuffled labels (control)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, name in zip(axes, (attribute, other), strict=True):
        for key, (colour, label) in styles.items():
            mean, error = effect.curves[key][name], effect.errors[key][name]
            ax.plot(effect.strengths, mean, marker="o", color=colour, label=label)
            ax.fill_between(effect.strengths, mean - error, mean + error, color=colour, alpha=0.2)
        ax.set_xlabel(f"edit strength α along the {attribute} direction")
        ax.set_ylabel(f"measured {name}")
        ax.set_title(f"{name}: {'edited' if name == attribute else 'should stay put after debiasing'}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"W2W edits of {len(effect.held_out)} held-out toy LoRAs (same prompts and seeds at every α)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
