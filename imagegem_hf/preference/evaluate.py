"""Evaluation of personal preference prediction as in paper 003's Tables 1–3 and Figs. 3 and 5.

- Pairwise top-1 accuracy (1 like vs 1 dislike): **both** images of a pair are scored with the same references and
  the one with the higher `P(like)` is the prediction (the published evaluation scored only one image).
- 1 like vs 3 dislikes: the liked target and three of the user's disliked images (not among the references) are
  scored; top-1/2/3 accuracy of the liked one.
- Seen vs unseen users and the gap; accuracy vs the number of references `N_ref` (a PNG).
- Zero-shot baselines (CLIP score, PickScore, ... any `imagegem_hf.scoring.Scorer`) in the same table.
- User–user similarity from the attention of the target tokens to the prototypes (which users share taste).

Ties count as expected values under random tie-breaking, so a constant scorer sits exactly at chance.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from imagegem_hf.hub import atomic_directory, write_json
from imagegem_hf.preference.data import PreferenceExample, by_user
from imagegem_hf.preference.sequence import PreferenceSequenceBuilder, build_pair_batch

TOPK = (1, 2, 3)


def pairwise_accuracy(score0: np.ndarray, score1: np.ndarray, label0: np.ndarray) -> float:
    """Fraction of pairs whose preferred image has the higher score (ties count ½).

    Example:
        ```python
        >>> import numpy as np
        >>> pairwise_accuracy(np.array([0.9, 0.2, 0.5]), np.array([0.1, 0.3, 0.5]), np.array([1, 1, 0]))
        0.5
        ```
    """
    score0, score1, label0 = (np.asarray(a, dtype=np.float64) for a in (score0, score1, label0))
    liked = np.where(label0 == 1, score0, score1)
    other = np.where(label0 == 1, score1, score0)
    if len(liked) == 0:
        return float("nan")
    return float(np.mean((liked > other) + 0.5 * (liked == other)))


def topk_accuracy(scores: np.ndarray, k: int) -> float:
    """Top-k accuracy of column 0 (the liked image) among each row's candidates, ties broken at random in
    expectation.

    Example:
        ```python
        >>> import numpy as np
        >>> topk_accuracy(np.array([[0.9, 0.1, 0.2, 0.3], [0.1, 0.5, 0.6, 0.7]]), k=1)
        0.5
        ```
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return float("nan")
    liked, others = scores[:, :1], scores[:, 1:]
    greater = (others > liked).sum(axis=1)
    ties = (others == liked).sum(axis=1)
    return float(np.mean(np.clip((k - greater) / (ties + 1), 0.0, 1.0)))


def one_vs_three_groups(
    examples: Sequence[PreferenceExample], n_dislikes: int = 3, seed: int = 0
) -> list[tuple[PreferenceExample, list[str]]]:
    """For each example: `[liked, d1, d2, d3]`, the target's disliked image plus disliked images of the same user's
    other targets that are not among this example's references (examples without enough such images are skipped).
    """
    rng = np.random.default_rng(seed)
    groups = []
    for user_examples in by_user(examples).values():
        for e in user_examples:
            in_refs = {key for ref in e.references for key in ref[:2]}
            pool = sorted({o.disliked for o in user_examples if o is not e} - in_refs - {e.liked, e.disliked})
            if len(pool) < n_dislikes - 1:
                continue
            extra = rng.choice(pool, size=n_dislikes - 1, replace=False).tolist()
            groups.append((e, [e.liked, e.disliked, *extra]))
    return groups


@torch.no_grad()
def score_pairs(
    model,
    builder: PreferenceSequenceBuilder,
    examples: Sequence[PreferenceExample],
    load_image: Callable[[str], Image.Image],
    n_ref: int | None = None,
    batch_size: int = 8,
    desc: str = "pairs",
    targets: Sequence[tuple[str, str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`P(like)` of two target images of each example, both scored on one shared encoding of its references.

    Args:
        model: A `PreferencePrototypeModel`.
        builder: Its sequence builder.
        examples: The examples whose first `n_ref` references are shown.
        load_image: Image key → PIL image.
        n_ref: References per example (default: all the example stores).
        batch_size: Examples per forward pass.
        desc: Progress bar label.
        targets: Per example, the two image keys to score (default `(image0, image1)`).

    Returns:
        The scores of the first and of the second target of every example.

    Example:
        ```python
        >>> p0, p1 = score_pairs(model, builder, examples, images.__getitem__)  # doctest: +SKIP
        ```
    """
    targets = [(e.image0, e.image1) for e in examples] if targets is None else list(targets)
    if len(targets) != len(examples):
        raise ValueError(f"targets has {len(targets)} entries for {len(examples)} examples; give one pair each.")
    device = next(model.parameters()).device
    first, second = [], []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=len(examples) <= batch_size):
        chunk = list(zip(examples[start : start + batch_size], targets[start : start + batch_size], strict=True))
        batch = build_pair_batch(
            builder,
            [e.query(load_image, a, n_ref) for e, (a, _) in chunk],
            [e.query(load_image, b, n_ref) for e, (_, b) in chunk],
        ).to(device)
        p_like = model(**batch).p_like.float().cpu().numpy()
        first.append(p_like[: len(chunk)])
        second.append(p_like[len(chunk) :])
    if not examples:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(first), np.concatenate(second)


def prototype_attention_by_user(
    model,
    builder: PreferenceSequenceBuilder,
    examples: Sequence[PreferenceExample],
    load_image: Callable[[str], Image.Image],
    batch_size: int = 8,
    n_ref: int | None = None,
) -> pd.DataFrame:
    """Mean attention of each user's target tokens to each prototype (users × prototypes), on the liked targets
    with their first `n_ref` references (default `model.config.n_ref`).

    Runs the backbone with eager attention for the duration of the call.
    """
    n_ref = model.config.n_ref if n_ref is None else n_ref
    backbone = model.backbone
    previous = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")
    device = next(model.parameters()).device
    rows: dict[str, list[np.ndarray]] = {}
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = builder([e.query(load_image, e.liked, n_ref) for e in chunk]).to(device)
                attention = model(**batch, output_prototype_attention=True).prototype_attention.float().cpu().numpy()
                for e, a in zip(chunk, attention, strict=True):
                    rows.setdefault(e.user_id, []).append(a)
    finally:
        backbone.set_attn_implementation(previous)
    frame = pd.DataFrame({user: np.mean(v, axis=0) for user, v in rows.items()}).T
    frame.columns = [f"prototype_{i}" for i in range(frame.shape[1])]
    return frame


def user_similarity(attention: pd.DataFrame) -> pd.DataFrame:
    """Cosine similarity between users' centred prototype-attention profiles (which users share taste)."""
    values = attention.to_numpy(dtype=np.float64)
    values = values - values.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    unit = values / np.maximum(norms, 1e-12)
    return pd.DataFrame(unit @ unit.T, index=attention.index, columns=attention.index)


@dataclass
class PreferenceEvalResult:
    """The evaluation table (methods × metrics), the accuracy-vs-`N_ref` curve and the user similarity."""

    table: pd.DataFrame
    nref_curve: dict[int, float] = field(default_factory=dict)
    prototype_attention: pd.DataFrame | None = None
    similarity: pd.DataFrame | None = None

    def markdown(self) -> str:
        """The table as Markdown (percentages)."""
        shown = (self.table * 100).round(2)
        header = "| method | " + " | ".join(shown.columns) + " |"
        lines = [header, "|" + "---|" * (len(shown.columns) + 1)]
        for method, row in shown.iterrows():
            lines.append(f"| {method} | " + " | ".join("–" if np.isnan(v) else f"{v:.2f}" for v in row) + " |")
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, name: str = "preference_eval") -> dict[str, Path]:
        """Write `<name>.md/.csv/.json`, `<name>_nref.png` and the user similarity (`.csv`, `.png`) atomically.

        Returns:
            `{what: path}`.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        staged = output_dir / f".{name}"
        with atomic_directory(staged, overwrite=True) as tmp:
            (tmp / f"{name}.md").write_text(self.markdown() + "\n", encoding="utf-8")
            self.table.to_csv(tmp / f"{name}.csv")
            write_json(
                tmp / f"{name}.json",
                {
                    "table": self.table.to_dict(orient="index"),
                    "nref_curve": {str(k): v for k, v in self.nref_curve.items()},
                },
            )
            if self.nref_curve:
                fig, ax = plt.subplots(figsize=(4, 3))
                ax.plot(list(self.nref_curve), [v * 100 for v in self.nref_curve.values()], marker="o")
                ax.axhline(50, color="gray", linestyle="--", linewidth=1)
                ax.set_xlabel("reference pairs N_ref")
                ax.set_ylabel("pairwise top-1 accuracy (%)")
                fig.tight_layout()
                fig.savefig(tmp / f"{name}_nref.png", dpi=120)
                plt.close(fig)
            if self.similarity is not None:
                self.similarity.to_csv(tmp / f"{name}_user_similarity.csv")
                fig, ax = plt.subplots(figsize=(4, 3.5))
                image = ax.imshow(self.similarity.to_numpy(), cmap="viridis", vmin=-1, vmax=1)
                ax.set_title("user–user similarity (prototype attention)", fontsize=8)
                users = list(self.similarity.index)
                ticks = range(len(users)) if len(users) <= 20 else []
                ax.set_xticks(list(ticks), [users[i] for i in ticks], rotation=90, fontsize=6)
                ax.set_yticks(list(ticks), [users[i] for i in ticks], fontsize=6)
                fig.colorbar(image)
                fig.tight_layout()
                fig.savefig(tmp / f"{name}_user_similarity.png", dpi=120)
                plt.close(fig)
        paths = {}
        for file in sorted(staged.glob("[!.]*")):  # the files written above, not atomic_directory's marker
            target = output_dir / file.name
            file.replace(target)
            paths[file.name] = target
        shutil.rmtree(staged)
        return paths


def _group_scores(model, builder, test_sets, pair_scores, groups, load_image, n_ref: int, batch_size: int):
    """`P(like)` of each 1-vs-3 group's `[liked, disliked, d2, d3]` (groups × 4), or None without groups.

    The liked and the disliked target are the example's own pair, already in `pair_scores`; the two extra dislikes
    are scored as one more pair on the same shared reference prefix. A group thus costs one prefix encoding instead
    of four full sequences (whose token ids the prefix split reproduces, see `build_pair_batch`).
    """
    if not groups:
        return None
    own = {}
    for split, examples in test_sets.items():
        p0, p1, _ = pair_scores[split]
        for e, s0, s1 in zip(examples, p0, p1, strict=True):
            own[id(e)] = (s0, s1) if e.liked == e.image0 else (s1, s0)
    extra = score_pairs(
        model,
        builder,
        [e for e, _ in groups],
        load_image,
        n_ref,
        batch_size=batch_size,
        desc="1 vs 3",
        targets=[(keys[2], keys[3]) for _, keys in groups],
    )
    return np.column_stack([np.array([own[id(e)] for e, _ in groups]), *extra])


def _metrics(pair_scores: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], group_scores: np.ndarray | None):
    all_scores = [np.concatenate(parts) for parts in zip(*pair_scores.values(), strict=True)]
    row = {"pairwise top-1": pairwise_accuracy(*all_scores)}
    for split in ("seen", "unseen"):
        row[f"pairwise {split}"] = pairwise_accuracy(*pair_scores[split]) if split in pair_scores else float("nan")
    row["unseen − seen"] = row["pairwise unseen"] - row["pairwise seen"]
    for k in TOPK:
        row[f"1v3 top-{k}"] = topk_accuracy(group_scores, k) if group_scores is not None else float("nan")
    return row


def evaluate_preference(
    model,
    builder: PreferenceSequenceBuilder,
    test_sets: Mapping[str, Sequence[PreferenceExample]],
    load_image: Callable[[str], Image.Image],
    baselines: Mapping[str, object] | None = None,
    nref_values: Sequence[int] | None = None,
    user_similarity_users: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    n_ref: int | None = None,
) -> PreferenceEvalResult:
    """Paper 003's evaluation of a model and zero-shot baselines.

    Every example is scored with its first `n_ref` references (the model's configured `N_ref` by default, as in
    training), whatever number of references the example stores.

    Args:
        model: A `PreferencePrototypeModel` (in eval mode).
        builder: Its sequence builder.
        test_sets: `{"seen": examples, "unseen": examples}` (either may be missing).
        load_image: Image key → PIL image.
        baselines: `{name: scorer}` with `scorer.score(images, prompts)` (e.g. `imagegem_hf.scoring.CLIPScore`).
        nref_values: `N_ref` values of the accuracy curve (default `1..n_ref`; empty to skip).
        user_similarity_users: Compute the prototype-attention user similarity on this many users (0 skips).
        batch_size: Sequences per forward pass.
        seed: Seed of the 1-vs-3 negative draws.
        n_ref: References per example in the table and the 1-vs-3 scores (default `model.config.n_ref`).

    Returns:
        A [`PreferenceEvalResult`].

    Example:
        ```python
        >>> result = evaluate_preference(model, builder, {"seen": seen, "unseen": unseen}, images.__getitem__,
        ...                              baselines={"CLIP score": CLIPScore(clip, clip_processor)})  # doctest: +SKIP
        >>> print(result.markdown())  # doctest: +SKIP
        ```
    """
    unknown = sorted(set(test_sets) - {"seen", "unseen"})
    if unknown or not test_sets:
        raise ValueError(f"test_sets keys must be 'seen' and/or 'unseen', got {sorted(test_sets)}.")
    all_examples = [e for examples in test_sets.values() for e in examples]
    if not all_examples:
        raise ValueError("The test sets are empty.")
    groups = one_vs_three_groups(all_examples, seed=seed)
    n_ref = model.config.n_ref if n_ref is None else n_ref

    def model_scores(references: int):
        pairs = {}
        for split, examples in test_sets.items():
            p0, p1 = score_pairs(model, builder, examples, load_image, references, batch_size=batch_size, desc=split)
            pairs[split] = (p0, p1, np.array([e.label0 for e in examples]))
        return pairs

    rows = {}
    pair_scores = model_scores(n_ref)
    group_scores = _group_scores(model, builder, test_sets, pair_scores, groups, load_image, n_ref, batch_size)
    rows["preference model"] = _metrics(pair_scores, group_scores)
    for name, scorer in (baselines or {}).items():
        pairs = {}
        for split, examples in test_sets.items():
            images = [load_image(e.image0) for e in examples] + [load_image(e.image1) for e in examples]
            s = scorer.score(images, [e.prompt for e in examples] * 2)
            s = np.asarray(s.float().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
            pairs[split] = (s[: len(examples)], s[len(examples) :], np.array([e.label0 for e in examples]))
        g = None
        if groups:
            g_images = [load_image(key) for _, keys in groups for key in keys]
            g_prompts = [e.prompt for e, keys in groups for _ in keys]
            g = scorer.score(g_images, g_prompts)
            g = np.asarray(g.float().cpu() if isinstance(g, torch.Tensor) else g).reshape(len(groups), -1)
        rows[name] = _metrics(pairs, g)
    table = pd.DataFrame.from_dict(rows, orient="index")

    values = list(range(1, n_ref + 1)) if nref_values is None else list(nref_values)
    curve = {}
    for n in values:
        scores = model_scores(n)
        curve[n] = pairwise_accuracy(*(np.concatenate(parts) for parts in zip(*scores.values(), strict=True)))

    attention = similarity = None
    if user_similarity_users and model.prototypes is not None:
        users = list(by_user(all_examples))[:user_similarity_users]
        chosen = [e for e in all_examples if e.user_id in set(users)]
        attention = prototype_attention_by_user(model, builder, chosen, load_image, batch_size=batch_size, n_ref=n_ref)
        similarity = user_similarity(attention)
    return PreferenceEvalResult(table=table, nref_curve=curve, prototype_attention=attention, similarity=similarity)
