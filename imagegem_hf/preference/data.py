"""Per-user preference data: Pick-a-Pic-v2-style records → per-user examples, the published format, synthetic users.

Paper 003 (REFERENCE §7) builds its data from Pick-a-Pic v2: every record is a pair of images generated from one
caption with a label; ties are dropped; users with at least 11 unique liked images are kept and split into train,
validation and test users. The test set has two parts: *seen* (held-out pairs of training users) and *unseen* (users
never seen in training). Each example is one target pair with `n_ref` of the same user's other pairs as references,
in the published processed format:

`user_id, reference_list, reference_list_bad, reference_prompt_list, image0, image1, prompt, label0`

Image columns hold image keys (Pick-a-Pic image uids, file names, ...); the pixels live in an `images` table
(`key, image` PNG/JPEG bytes) next to the examples, or are loaded by the caller. `save_preference_dataset` writes
a Hub-shaped folder: one parquet file per split under `pairs/`, `images/` and a dataset card.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from imagegem_hf.hub import atomic_directory, render_card, resolve
from imagegem_hf.preference.sequence import PreferenceQuery, ReferencePair, build_pair_batch

PUBLISHED_COLUMNS = (
    "user_id",
    "reference_list",
    "reference_list_bad",
    "reference_prompt_list",
    "image0",
    "image1",
    "prompt",
    "label0",
)
SPLITS = ("train", "validation", "test_seen", "test_unseen")


@dataclass
class PreferenceExample:
    """One target pair of a user with that user's reference pairs (image keys, not pixels).

    Attributes:
        user_id: The user.
        references: `(liked_key, disliked_key, prompt)` reference pairs.
        image0, image1: Keys of the two target images.
        prompt: The target pair's caption.
        label0: 1 if the user preferred `image0`, else 0.
    """

    user_id: str
    references: list[tuple[str, str, str]]
    image0: str
    image1: str
    prompt: str
    label0: int

    @property
    def liked(self) -> str:
        return self.image0 if self.label0 else self.image1

    @property
    def disliked(self) -> str:
        return self.image1 if self.label0 else self.image0

    def to_row(self) -> dict[str, Any]:
        """The published processed format."""
        return {
            "user_id": self.user_id,
            "reference_list": [r[0] for r in self.references],
            "reference_list_bad": [r[1] for r in self.references],
            "reference_prompt_list": [r[2] for r in self.references],
            "image0": self.image0,
            "image1": self.image1,
            "prompt": self.prompt,
            "label0": int(self.label0),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PreferenceExample:
        """Read one row of the published processed format."""
        missing = [c for c in PUBLISHED_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"Row lacks the columns {missing} of the processed format {list(PUBLISHED_COLUMNS)}.")
        good, bad, prompts = (list(row[c]) for c in PUBLISHED_COLUMNS[1:4])
        if not len(good) == len(bad) == len(prompts):
            raise ValueError(
                f"User {row['user_id']}: reference lists differ in length ({len(good)}, {len(bad)}, {len(prompts)})."
            )
        label0 = float(row["label0"])
        if label0 not in (0.0, 1.0):
            raise ValueError(f"label0 must be 0 or 1 (ties are dropped), got {row['label0']!r}.")
        return cls(
            user_id=str(row["user_id"]),
            references=[(str(g), str(b), str(p)) for g, b, p in zip(good, bad, prompts, strict=True)],
            image0=str(row["image0"]),
            image1=str(row["image1"]),
            prompt=str(row["prompt"]),
            label0=int(label0),
        )

    def query(self, load_image: Callable[[str], Image.Image], target: str, n_ref: int | None = None):
        """A `PreferenceQuery` for `target` (one of `image0`/`image1`) with the first `n_ref` references."""
        refs = self.references if n_ref is None else self.references[:n_ref]
        pairs = [ReferencePair(load_image(g), load_image(b), p) for g, b, p in refs]
        return PreferenceQuery(pairs, load_image(target), self.prompt)


@dataclass
class UserPairs:
    """A user's non-tied pairs as `(liked_key, disliked_key, caption)`."""

    user_id: str
    pairs: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def n_unique_liked(self) -> int:
        return len({p[0] for p in self.pairs})


def group_pickapic_records(records: Iterable[Mapping[str, Any]]) -> dict[str, UserPairs]:
    """Group Pick-a-Pic-v2-style records (`user_id, image_0, image_1, label_0, caption`) by user, dropping ties.

    `label_0` is 1 when `image_0` won, 0 when `image_1` won and 0.5 for a tie (dropped).

    Example:
        ```python
        >>> users = group_pickapic_records([
        ...     {"user_id": 1, "image_0": "a", "image_1": "b", "label_0": 1, "caption": "cat"},
        ...     {"user_id": 1, "image_0": "c", "image_1": "d", "label_0": 0.5, "caption": "dog"},
        ... ])
        >>> users["1"].pairs
        [('a', 'b', 'cat')]
        ```
    """
    users: dict[str, UserPairs] = {}
    for record in records:
        label = float(record["label_0"])
        if label == 0.5:
            continue
        if label not in (0.0, 1.0):
            raise ValueError(f"label_0 must be 0, 0.5 or 1, got {record['label_0']!r} (user {record['user_id']}).")
        liked, disliked = (
            (record["image_0"], record["image_1"]) if label == 1.0 else (record["image_1"], record["image_0"])
        )
        user = users.setdefault(str(record["user_id"]), UserPairs(str(record["user_id"])))
        user.pairs.append((str(liked), str(disliked), str(record.get("caption") or "")))
    return users


def user_examples(user: UserPairs, targets: Sequence[int], n_ref: int, rng: np.random.Generator):
    """One `PreferenceExample` per target pair index, with `n_ref` references drawn from the user's other pairs.

    The target's two images are put in random order (`label0` says which was liked).
    """
    examples = []
    for t in targets:
        others = [i for i in range(len(user.pairs)) if i != t]
        chosen = rng.choice(others, size=min(n_ref, len(others)), replace=False)
        liked, disliked, caption = user.pairs[t]
        flip = bool(rng.integers(2))
        examples.append(
            PreferenceExample(
                user_id=user.user_id,
                references=[user.pairs[int(i)] for i in chosen],
                image0=disliked if flip else liked,
                image1=liked if flip else disliked,
                prompt=caption,
                label0=0 if flip else 1,
            )
        )
    return examples


def build_user_splits(
    users: Mapping[str, UserPairs],
    min_liked: int = 11,
    n_ref: int = 8,
    val_users: int = 89,
    test_users: int = 70,
    seen_users: int = 70,
    seen_pairs_per_user: int = 2,
    seed: int = 0,
) -> dict[str, list[PreferenceExample]]:
    """Split users as in paper 003 and build per-user examples.

    Users with at least `min_liked` unique liked images are kept and shuffled; `test_users` become the unseen test
    users, `val_users` the validation users and the rest training users. From `seen_users` of the training users,
    `seen_pairs_per_user` pairs are held out as the seen test set (their references come from the same user's
    training pairs). Every remaining pair of a training user is one training example.

    Args:
        users: From `group_pickapic_records`.
        min_liked: Minimum number of unique liked images per user.
        n_ref: References per example.
        val_users: Validation users.
        test_users: Unseen test users.
        seen_users: Training users that give held-out (seen) test pairs.
        seen_pairs_per_user: Held-out pairs per seen user.
        seed: Seed of the split, the reference draws and the pair order.

    Returns:
        `{"train", "validation", "test_seen", "test_unseen"}` → examples.

    Raises:
        ValueError: Too few eligible users for the requested validation and test users.

    Example:
        ```python
        >>> from imagegem_hf.preference.data import synthetic_pickapic_records
        >>> records, _ = synthetic_pickapic_records(n_users=12, pairs_per_user=12)
        >>> splits = build_user_splits(group_pickapic_records(records), val_users=2, test_users=2, seen_users=2)
        >>> sorted(splits)
        ['test_seen', 'test_unseen', 'train', 'validation']
        ```
    """
    rng = np.random.default_rng(seed)
    eligible = sorted(u for u, pairs in users.items() if pairs.n_unique_liked >= min_liked)
    if len(eligible) <= val_users + test_users:
        raise ValueError(
            f"Only {len(eligible)} users have >= {min_liked} unique liked images; need more than "
            f"val_users + test_users = {val_users + test_users}. Lower min_liked, val_users or test_users."
        )
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    unseen, val, train = (
        order[:test_users],
        order[test_users : test_users + val_users],
        order[test_users + val_users :],
    )
    splits: dict[str, list[PreferenceExample]] = {name: [] for name in SPLITS}
    seen = set(train[:seen_users])
    for user_id in train:
        user = users[user_id]
        indices = rng.permutation(len(user.pairs)).tolist()
        held = indices[:seen_pairs_per_user] if user_id in seen else []
        kept = [i for i in indices if i not in held]
        training_user = UserPairs(user_id, [user.pairs[i] for i in kept])
        splits["train"] += user_examples(training_user, range(len(kept)), n_ref, rng)
        for i in held:  # references come from the user's training pairs only
            with_target = UserPairs(user_id, training_user.pairs + [user.pairs[i]])
            splits["test_seen"] += user_examples(with_target, [len(kept)], n_ref, rng)
    for name, group in (("validation", val), ("test_unseen", unseen)):
        for user_id in group:
            user = users[user_id]
            splits[name] += user_examples(user, range(len(user.pairs)), n_ref, rng)
    return splits


def read_processed(path_or_repo_id: str | os.PathLike | pd.DataFrame, split: str | None = None):
    """Read examples in the published processed format from a DataFrame, a parquet/JSON-lines file, or a dataset
    folder / Hub repo id written by `save_preference_dataset` (then `split` names the split).

    Example:
        ```python
        >>> examples = read_processed("demo_output/preference/dataset", split="test_unseen")  # doctest: +SKIP
        ```
    """
    if isinstance(path_or_repo_id, pd.DataFrame):
        frame = path_or_repo_id
    else:
        path = Path(path_or_repo_id)
        if path.is_file():
            frame = pd.read_json(path, lines=True) if path.suffix in (".jsonl", ".json") else pd.read_parquet(path)
        else:
            root = resolve(path_or_repo_id, repo_type="dataset")
            if split is None:
                raise ValueError(f"{root} is a dataset folder; pass split= one of {list(SPLITS)}.")
            file = root / "pairs" / f"{split}.parquet"
            if not file.is_file():
                raise FileNotFoundError(
                    f"{file} does not exist; splits there: {sorted(p.stem for p in file.parent.glob('*.parquet'))}."
                )
            frame = pd.read_parquet(file)
    return [PreferenceExample.from_row(row) for row in frame.to_dict(orient="records")]


def load_images_table(path_or_repo_id: str | os.PathLike) -> dict[str, Image.Image]:
    """The `images` table of a dataset folder (or Hub repo) as `{key: PIL image}`."""
    root = resolve(path_or_repo_id, repo_type="dataset")
    frame = pd.read_parquet(root / "images" / "images.parquet")
    return {
        str(k): Image.open(io.BytesIO(b)).convert("RGB") for k, b in zip(frame["key"], frame["image"], strict=True)
    }


def save_preference_dataset(
    splits: Mapping[str, Sequence[PreferenceExample]],
    output_dir: str | os.PathLike,
    images: Mapping[str, Image.Image] | None = None,
    source: str = "Pick-a-Pic v2",
    overwrite: bool = False,
) -> Path:
    """Write a Hub-shaped dataset folder: `pairs/<split>.parquet` (published format), optionally
    `images/images.parquet` (`key`, PNG `image` bytes), and a card whose YAML lists the configs.

    Example:
        ```python
        >>> save_preference_dataset(splits, "out/pickapic-users", images)  # doctest: +SKIP
        ```
    """
    counts = {}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        (tmp / "pairs").mkdir()
        for name, examples in splits.items():
            frame = pd.DataFrame([e.to_row() for e in examples], columns=list(PUBLISHED_COLUMNS))
            frame.to_parquet(tmp / "pairs" / f"{name}.parquet", index=False)
            counts[name] = {"examples": len(examples), "users": len({e.user_id for e in examples})}
        if images is not None:
            (tmp / "images").mkdir()
            rows = []
            for key, image in images.items():
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                rows.append({"key": key, "image": buffer.getvalue()})
            pd.DataFrame(rows).to_parquet(tmp / "images" / "images.parquet", index=False)
        card = render_card(
            "preference_card.md",
            kind="dataset",
            splits=list(splits),
            counts=counts,
            source=source,
            has_images=images is not None,
            config={},
            metrics={},
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(output_dir)


COLORS = {"red": (200, 40, 40), "blue": (40, 60, 200), "green": (40, 170, 60), "yellow": (210, 200, 40)}


def planted_image(color: str, rng: np.random.Generator, size: int = 16, strength: float = 0.6) -> Image.Image:
    """A noisy image dominated by `color` (the planted visual attribute of synthetic users)."""
    base = np.array(COLORS[color], dtype=np.float32)
    noise = rng.integers(0, 256, (size, size, 3)).astype(np.float32)
    pixels = strength * base + (1 - strength) * noise
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def synthetic_pickapic_records(
    n_users: int = 40,
    pairs_per_user: int = 14,
    tastes: Sequence[str] = ("red", "blue"),
    image_size: int = 16,
    tie_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Image.Image]]:
    """Pick-a-Pic-v2-style records of synthetic users with a planted visual attribute, and their images.

    User `u` has taste `tastes[u % len(tastes)]`: in each pair one image is dominated by that colour and the other
    by another colour of `tastes` (or of all colours when one taste is given), and the user prefers the first. A
    `tie_fraction` of records are ties (label 0.5), which the pipeline must drop.

    Returns:
        `(records, images)`: the records (`user_id, image_0, image_1, label_0, caption`) and `{key: PIL image}`.

    Example:
        ```python
        >>> records, images = synthetic_pickapic_records(n_users=2, pairs_per_user=3)
        >>> sorted(records[0])
        ['caption', 'image_0', 'image_1', 'label_0', 'user_id']
        ```
    """
    unknown = sorted(set(tastes) - set(COLORS))
    if unknown:
        raise ValueError(f"Unknown taste colour(s) {unknown}; choose from {sorted(COLORS)}.")
    rng = np.random.default_rng(seed)
    records, images = [], {}
    subjects = ("a cat", "a castle", "a portrait", "a forest", "a car", "a city at night")
    for u in range(n_users):
        taste = tastes[u % len(tastes)]
        others = [c for c in (tastes if len(tastes) > 1 else COLORS) if c != taste]
        for p in range(pairs_per_user):
            liked_key, disliked_key = f"u{u}-p{p}-a", f"u{u}-p{p}-b"
            images[liked_key] = planted_image(taste, rng, image_size)
            images[disliked_key] = planted_image(str(rng.choice(others)), rng, image_size)
            swap = bool(rng.integers(2))
            tie = rng.random() < tie_fraction
            records.append(
                {
                    "user_id": f"user{u}",
                    "image_0": disliked_key if swap else liked_key,
                    "image_1": liked_key if swap else disliked_key,
                    "label_0": 0.5 if tie else (0 if swap else 1),
                    "caption": f"{subjects[p % len(subjects)]}, style {p}",
                }
            )
    return records, images


class PreferenceCollator:
    """Collate `PreferenceExample`s into one batch scoring both target images with the same references.

    Both targets of an example get the same references in the same order (shuffled per call when
    `shuffle_references`, as in paper 003's training). With `share_prefix` (default) the batch is a `PairBatch`: the
    references are encoded once per example and the two target turns on top of them; otherwise it holds `2 · B`
    full left-padded sequences (liked targets first). Either way the model returns the `B` liked targets' logits,
    then the `B` disliked ones, and `labels` is 1 for the first half and 0 for the second.

    Args:
        builder: The sequence builder of the model.
        load_image: Maps an image key to a PIL image (e.g. `images.__getitem__`).
        n_ref: References per example (the first `n_ref`).
        shuffle_references: Shuffle the reference turns of every example on every call.
        seed: Seed of the shuffles.
        share_prefix: Encode the shared references once per example (`build_pair_batch`).

    Example:
        ```python
        >>> collator = PreferenceCollator(builder, images.__getitem__, n_ref=8)  # doctest: +SKIP
        >>> batch = collator(examples[:2])  # 4 rows  # doctest: +SKIP
        ```
    """

    def __init__(
        self,
        builder,
        load_image: Callable[[str], Image.Image],
        n_ref: int = 8,
        shuffle_references: bool = True,
        seed: int = 0,
        share_prefix: bool = True,
    ):
        self.builder, self.load_image, self.n_ref = builder, load_image, n_ref
        self.shuffle_references, self.share_prefix = shuffle_references, share_prefix
        self.rng = np.random.default_rng(seed)

    def __call__(self, examples: Sequence[PreferenceExample]):
        examples = [e if isinstance(e, PreferenceExample) else PreferenceExample.from_row(e) for e in examples]
        pos = [e.query(self.load_image, e.liked, self.n_ref) for e in examples]
        neg = [e.query(self.load_image, e.disliked, self.n_ref) for e in examples]
        orders = self.builder.random_orders(pos, self.rng) if self.shuffle_references else [None] * len(pos)
        if self.share_prefix:
            return build_pair_batch(self.builder, pos, neg, orders)
        return self.builder(pos + neg, orders=orders + orders, labels=[1] * len(pos) + [0] * len(neg))


def by_user(examples: Iterable[PreferenceExample]) -> dict[str, list[PreferenceExample]]:
    """Group examples by `user_id`, keeping their order."""
    grouped: dict[str, list[PreferenceExample]] = defaultdict(list)
    for e in examples:
        grouped[e.user_id].append(e)
    return dict(grouped)


def read_records(path: str | os.PathLike, image_bytes_columns: tuple[str, str] | None = None):
    """Read Pick-a-Pic-v2-style records from a parquet or JSON-lines file.

    Args:
        path: The file; needs the columns `user_id, image_0, image_1, label_0, caption` (image columns hold keys,
            e.g. Pick-a-Pic's `image_0_uid`/`image_1_uid` renamed).
        image_bytes_columns: Columns holding the encoded images of `image_0`/`image_1` (Pick-a-Pic: `jpg_0`,
            `jpg_1`), collected into the `images` table; None leaves the pixels out.

    Returns:
        `(records, images)`, where `images` maps keys to PIL images (empty without `image_bytes_columns`).

    Example:
        ```python
        >>> records, images = read_records("pickapic_v2_train.parquet", ("jpg_0", "jpg_1"))  # doctest: +SKIP
        ```
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    frame = pd.read_json(path, lines=True) if path.suffix in (".jsonl", ".json") else pd.read_parquet(path)
    needed = ["user_id", "image_0", "image_1", "label_0", "caption"] + list(image_bytes_columns or [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; it has {list(frame.columns)}.")
    images: dict[str, Image.Image] = {}
    if image_bytes_columns:
        for key_column, bytes_column in zip(("image_0", "image_1"), image_bytes_columns, strict=True):
            for key, data in zip(frame[key_column], frame[bytes_column], strict=True):
                if str(key) not in images:
                    images[str(key)] = Image.open(io.BytesIO(data)).convert("RGB")
    return frame[["user_id", "image_0", "image_1", "label_0", "caption"]].to_dict(orient="records"), images


def load_preference_dataset(path_or_repo_id: str | os.PathLike):
    """Every split of a folder (or Hub repo) written by `save_preference_dataset`, and its images.

    Returns:
        `(splits, images)`: `{split: examples}` and `{key: PIL image}` (empty when the folder has no `images/`).

    Example:
        ```python
        >>> splits, images = load_preference_dataset("demo_output/preference/dataset")  # doctest: +SKIP
        ```
    """
    root = resolve(path_or_repo_id, repo_type="dataset")
    files = sorted((root / "pairs").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root} has no pairs/*.parquet; build it with `imagegem preference build`.")
    splits = {file.stem: read_processed(file) for file in files}
    images = load_images_table(root) if (root / "images" / "images.parquet").is_file() else {}
    return splits, images
