"""Per-user preference data: Pick-a-Pic-v2-style records → per-user examples, the published format, synthetic users.

Paper 003 (REFERENCE §7) builds its data from Pick-a-Pic v2: every record is a pair of images generated from one
caption with a label; ties are dropped; users with at least 11 unique liked images are kept and split into train,
validation and test users. The test set has two parts: *seen* (held-out pairs of training users) and *unseen* (users
never seen in training). Each example is one target pair with `n_ref` of the same user's other pairs as references,
in the published processed format:

`user_id, reference_list, reference_list_bad, reference_prompt_list, image0, image1, prompt, label0`

Splits and references are drawn **by image**, because in Pick-a-Pic one image appears in several pairs: an
example's references never show one of its two target images, and a seen user's held-out images appear in none of
that user's training pairs.

Image columns hold image keys (Pick-a-Pic image uids, file names, ...); the pixels live in an `images` table
(`key, image` PNG/JPEG bytes) next to the examples. `save_preference_dataset` and `build_preference_dataset` write a
Hub-shaped folder of sharded parquet (`pairs/<split>-XXXXX-of-YYYYY.parquet`, `images/images-XXXXX-of-YYYYY.parquet`)
and a dataset card; `load_preference_dataset` reads it back lazily (examples row group by row group, images decoded
on access), so memory does not grow with the dataset.
"""

from __future__ import annotations

import io
import math
import os
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from imagegem_hf.hub import atomic_directory, card_license, hub_repo_id, render_card, resolve, size_category
from imagegem_hf.preference.dataset_io import (
    IMAGES_SCHEMA,
    CorruptImageError,
    ImageStore,
    MissingImageError,
    ParquetRows,
    ShardedParquetWriter,
    decode_image,
    iter_file_batches,
    key_hash,
    shard_files,
)
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
PAIRS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("reference_list", pa.list_(pa.string())),
        ("reference_list_bad", pa.list_(pa.string())),
        ("reference_prompt_list", pa.list_(pa.string())),
        ("image0", pa.string()),
        ("image1", pa.string()),
        ("prompt", pa.string()),
        ("label0", pa.int64()),
    ]
)
SPLITS = ("train", "validation", "test_seen", "test_unseen")
RECORD_COLUMNS = ("user_id", "image_0", "image_1", "label_0", "caption")
# Shard sizes: ~2,000 Pick-a-Pic JPEGs (~170 kB each) make a ~340 MB shard, under the 500 MB `push_to_hub` default
# of datasets; 100,000 pair rows with N_ref = 8 are ~30-60 MB.
MAX_PAIRS_PER_SHARD = 100_000
MAX_IMAGES_PER_SHARD = 2_000


def as_prompt(value: Any) -> str:
    """A prompt as text: None, NaN and pandas' NA mean "no prompt" (`""`), not the strings 'None' / 'nan'."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


@dataclass
class PreferenceExample:
    """One target pair of a user with that user's reference pairs (image keys, not pixels).

    Attributes:
        user_id: The user.
        references: `(liked_key, disliked_key, prompt)` reference pairs.
        image0, image1: Keys of the two target images.
        prompt: The target pair's caption ("" when it has none).
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
        try:
            label0 = float(row["label0"])
        except (TypeError, ValueError):
            label0 = float("nan")
        if label0 not in (0.0, 1.0):
            raise ValueError(
                f"User {row['user_id']}, pair ({row['image0']!r}, {row['image1']!r}): label0 must be 0 or 1 "
                f"(ties are dropped), got {row['label0']!r}."
            )
        keys = [row["image0"], row["image1"], *good, *bad]
        if any(as_prompt(k) == "" for k in keys):
            raise ValueError(f"User {row['user_id']}: an image key is missing (None/empty) in {keys}.")
        return cls(
            user_id=str(row["user_id"]),
            references=[(str(g), str(b), as_prompt(p)) for g, b, p in zip(good, bad, prompts, strict=True)],
            image0=str(row["image0"]),
            image1=str(row["image1"]),
            prompt=as_prompt(row["prompt"]),
            label0=int(label0),
        )

    def load(self, load_image: Callable[[str], Image.Image], key: str) -> Image.Image:
        """`load_image(key)`, with errors that name this example's user and the image.

        Raises:
            MissingImageError: `load_image` has no image `key`.
            CorruptImageError: The image's bytes cannot be decoded.
        """
        try:
            return load_image(key)
        except KeyError as err:
            raise MissingImageError(
                f"User {self.user_id}: image {key!r} is missing from the images table ({err}). Rebuild the dataset "
                "with its image bytes (the builder drops pairs whose images are missing) or pass the right table."
            ) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise CorruptImageError(f"User {self.user_id}: image {key!r} cannot be loaded: {err}") from err

    def query(self, load_image: Callable[[str], Image.Image], target: str, n_ref: int | None = None):
        """A `PreferenceQuery` for `target` (one of `image0`/`image1`) with the first `n_ref` references (fewer
        when the example has fewer)."""
        refs = self.references if n_ref is None else self.references[:n_ref]
        pairs = [ReferencePair(self.load(load_image, g), self.load(load_image, b), p) for g, b, p in refs]
        return PreferenceQuery(pairs, self.load(load_image, target), self.prompt, user_id=self.user_id)


@dataclass
class UserPairs:
    """A user's non-tied pairs as `(liked_key, disliked_key, caption)`."""

    user_id: str
    pairs: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def n_unique_liked(self) -> int:
        return len({p[0] for p in self.pairs})


def record_label(record: Mapping[str, Any]) -> float:
    """The `label_0` of a Pick-a-Pic record as 0.0, 0.5 (tie) or 1.0.

    Raises:
        ValueError: Anything else (None, NaN, text, 2, 0.3, ...), naming the user and the pair's images.
    """
    value = record.get("label_0")
    try:
        label = float(value)
    except (TypeError, ValueError):
        label = float("nan")
    if label not in (0.0, 0.5, 1.0):
        raise ValueError(
            f"User {record.get('user_id')!r}, pair ({record.get('image_0')!r}, {record.get('image_1')!r}): label_0 "
            f"must be 0 (image_1 won), 0.5 (tie) or 1 (image_0 won), got {value!r}. Fix or drop the record."
        )
    return label


def group_pickapic_records(records: Iterable[Mapping[str, Any]]) -> dict[str, UserPairs]:
    """Group Pick-a-Pic-v2-style records (`user_id, image_0, image_1, label_0, caption`) by user, dropping ties.

    `label_0` is 1 when `image_0` won, 0 when `image_1` won and 0.5 for a tie (dropped); any other label is an
    error naming the user. A None/NaN caption means no prompt (`""`).

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
        label = record_label(record)
        if label == 0.5:
            continue
        if as_prompt(record["image_0"]) == "" or as_prompt(record["image_1"]) == "":
            raise ValueError(f"User {record['user_id']!r}: a record has no image key: {dict(record)}.")
        liked, disliked = (
            (record["image_0"], record["image_1"]) if label == 1.0 else (record["image_1"], record["image_0"])
        )
        user = users.setdefault(str(record["user_id"]), UserPairs(str(record["user_id"])))
        user.pairs.append((str(liked), str(disliked), as_prompt(record.get("caption"))))
    return users


@dataclass
class DataIssues:
    """What building dropped or shortened, with counts and the first few users (or images) of each kind."""

    counts: Counter = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.counts[kind] += n
        shown = self.samples.setdefault(kind, [])
        if len(shown) < 5 and where not in shown:
            shown.append(where)

    def warn(self) -> None:
        """One warning listing every kind of issue with its count (nothing when there is none)."""
        if self.counts:
            lines = [f"{n} {kind} (e.g. {', '.join(self.samples[kind])})" for kind, n in sorted(self.counts.items())]
            warnings.warn("Preference data: " + "; ".join(lines) + ".", stacklevel=3)


SHORT_REFERENCES = "examples with fewer than n_ref references (kept with fewer)"
NO_REFERENCES = "target pairs without any reference pair that avoids their images (dropped)"
SHARED_WITH_HELD_OUT = "training pairs sharing an image with a held-out pair (dropped)"


def assign_user_roles(
    user_ids: Iterable[str], val_users: int, test_users: int, seen_users: int, seed: int
) -> dict[str, str]:
    """Each user's role: `test_unseen`, `validation`, `train`, or `seen` (a training user that also gives held-out
    test pairs). Users are sorted, then shuffled with `seed`."""
    eligible = sorted(user_ids)
    order = [eligible[i] for i in np.random.default_rng(seed).permutation(len(eligible))]
    roles = dict.fromkeys(order[:test_users], "test_unseen")
    roles |= dict.fromkeys(order[test_users : test_users + val_users], "validation")
    train = order[test_users + val_users :]
    roles |= dict.fromkeys(train, "train")
    roles |= dict.fromkeys(train[:seen_users], "seen")
    return roles


def _examples_by_image(
    user: UserPairs,
    targets: Sequence[int],
    pool: Sequence[int],
    n_ref: int,
    rng: np.random.Generator,
    issues: DataIssues,
) -> list[PreferenceExample]:
    """One example per target pair index, its references drawn from the `pool` pairs that show neither target image.

    The target's two images are put in random order (`label0` says which was liked).
    """
    pool = np.asarray(pool, dtype=np.int64)
    position = {int(i): k for k, i in enumerate(pool)}
    pairs_of_image: dict[str, list[int]] = defaultdict(list)
    for i in pool:
        for key in user.pairs[i][:2]:
            pairs_of_image[key].append(int(i))
    examples = []
    for t in targets:
        liked, disliked, caption = user.pairs[t]
        allowed = np.ones(len(pool), dtype=bool)
        for i in [t, *pairs_of_image.get(liked, ()), *pairs_of_image.get(disliked, ())]:
            if i in position:
                allowed[position[i]] = False
        candidates = pool[allowed]
        if len(candidates) == 0:
            issues.add(NO_REFERENCES, f"user {user.user_id} pair ({liked}, {disliked})")
            continue
        if len(candidates) < n_ref:
            issues.add(SHORT_REFERENCES, f"user {user.user_id} ({len(candidates)} < {n_ref})")
        chosen = rng.choice(candidates, size=min(n_ref, len(candidates)), replace=False)
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


def user_split_examples(
    user: UserPairs, role: str, n_ref: int, seen_pairs_per_user: int, seed: int, issues: DataIssues
) -> dict[str, list[PreferenceExample]]:
    """A user's examples per split, drawn by image with a random generator seeded by `(seed, user_id)`.

    Validation and unseen test users: every pair is a target. Training users: every pair is a training target;
    `seen` users first hold out `seen_pairs_per_user` random pairs as `test_seen` targets, and their training pairs
    are those that show none of the held-out images. References always come from the user's training pairs (for
    validation/unseen users: their other pairs) that show neither image of the target.
    """
    rng = np.random.default_rng([seed, zlib.crc32(user.user_id.encode())])
    everything = list(range(len(user.pairs)))
    if role in ("validation", "test_unseen"):
        return {role: _examples_by_image(user, everything, everything, n_ref, rng, issues)}
    if role not in ("train", "seen"):
        raise ValueError(f"Unknown role {role!r} for user {user.user_id}.")
    order = rng.permutation(len(user.pairs)).tolist()
    held = order[:seen_pairs_per_user] if role == "seen" else []
    held_images = {key for i in held for key in user.pairs[i][:2]}
    train = [i for i in order if i not in held and held_images.isdisjoint(user.pairs[i][:2])]
    issues.add(SHARED_WITH_HELD_OUT, f"user {user.user_id}", len(order) - len(held) - len(train))
    return {
        "train": _examples_by_image(user, train, train, n_ref, rng, issues),
        "test_seen": _examples_by_image(user, held, train, n_ref, rng, issues),
    }


def eligible_users(users: Mapping[str, UserPairs], min_liked: int, val_users: int, test_users: int) -> list[str]:
    """The users with at least `min_liked` unique liked images (sorted).

    Raises:
        ValueError: Not more of them than `val_users + test_users`.
    """
    eligible = sorted(u for u, pairs in users.items() if pairs.n_unique_liked >= min_liked)
    _check_enough(len(eligible), min_liked, val_users, test_users)
    return eligible


def _check_enough(n: int, min_liked: int, val_users: int, test_users: int) -> None:
    if n <= val_users + test_users:
        raise ValueError(
            f"Only {n} users have >= {min_liked} unique liked images; need more than "
            f"val_users + test_users = {val_users + test_users}. Lower min_liked, val_users or test_users."
        )


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
    """Split users as in paper 003 and build per-user examples, by image (see `user_split_examples`).

    Users with at least `min_liked` unique liked images are kept and shuffled; `test_users` become the unseen test
    users, `val_users` the validation users and the rest training users. From `seen_users` of the training users,
    `seen_pairs_per_user` pairs are held out as the seen test set. No example's references show one of its target
    images, and no held-out (seen test) image appears in a training pair of its user.

    Fewer references than `n_ref`: an example keeps the (fewer) references that avoid its images; a target with
    none is dropped. Both are counted in one warning (with the first users affected), as are training pairs dropped
    because they share an image with a held-out pair.

    Args:
        users: From `group_pickapic_records`.
        min_liked: Minimum number of unique liked images per user.
        n_ref: References per example.
        val_users: Validation users.
        test_users: Unseen test users.
        seen_users: Training users that give held-out (seen) test pairs.
        seen_pairs_per_user: Held-out pairs per seen user.
        seed: Seed of the user split; each user's draws use `(seed, user_id)`.

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
    eligible = eligible_users(users, min_liked, val_users, test_users)
    roles = assign_user_roles(eligible, val_users, test_users, seen_users, seed)
    splits: dict[str, list[PreferenceExample]] = {name: [] for name in SPLITS}
    issues = DataIssues()
    for user_id in sorted(roles):
        for name, examples in user_split_examples(
            users[user_id], roles[user_id], n_ref, seen_pairs_per_user, seed, issues
        ).items():
            splits[name] += examples
    issues.warn()
    return splits


class PreferenceSplit(Sequence[PreferenceExample]):
    """The examples of one split of a dataset folder, read from its parquet shards on demand (one row group at a
    time; iteration streams), so a split of any size costs the same memory. Works as a map-style dataset for
    `Trainer` and `DataLoader` (it pickles without its caches).

    Args:
        files: The split's parquet shards.

    Example:
        ```python
        >>> splits, images = load_preference_dataset("demo_output/preference/dataset")  # doctest: +SKIP
        >>> len(splits["train"]), splits["train"][0].user_id  # doctest: +SKIP
        ```
    """

    def __init__(self, files: Sequence[str | Path]):
        self.rows = ParquetRows(files)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return PreferenceExample.from_row(self.rows.row(int(index)))

    def __iter__(self) -> Iterator[PreferenceExample]:
        for batch in self.rows.iter_batches():
            for row in batch.to_pylist():
                yield PreferenceExample.from_row(row)

    def __repr__(self) -> str:
        return f"PreferenceSplit({len(self)} examples in {len(self.rows.files)} parquet file(s))"


def _split_files(root: Path, split: str) -> list[Path]:
    files = shard_files(root / "pairs", split)
    if not files:
        present = sorted({f.name.split("-")[0].removesuffix(".parquet") for f in (root / "pairs").glob("*.parquet")})
        raise FileNotFoundError(f"{root / 'pairs'} has no shards of split {split!r}; splits there: {present}.")
    return files


def read_processed(path_or_repo_id: str | os.PathLike | pd.DataFrame, split: str | None = None):
    """Read examples in the published processed format, as a list, from a DataFrame, a parquet/JSON-lines file, or
    a dataset folder / Hub repo id written by `save_preference_dataset` (then `split` names the split; for large
    splits prefer the lazy `load_preference_dataset`).

    Example:
        ```python
        >>> examples = read_processed("demo_output/preference/dataset", split="test_unseen")  # doctest: +SKIP
        ```
    """
    if isinstance(path_or_repo_id, pd.DataFrame):
        return [PreferenceExample.from_row(row) for row in path_or_repo_id.to_dict(orient="records")]
    path = Path(path_or_repo_id)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return read_processed(pd.read_json(path, lines=True))
    if path.is_file():
        return list(PreferenceSplit([path]))
    root = resolve(path_or_repo_id, repo_type="dataset")
    if split is None:
        raise ValueError(f"{root} is a dataset folder; pass split= one of {list(SPLITS)}.")
    return list(PreferenceSplit(_split_files(root, split)))


def load_images_table(path_or_repo_id: str | os.PathLike) -> ImageStore:
    """The `images` table of a dataset folder (or Hub repo): a `Mapping[str, PIL image]` that keeps the encoded
    bytes in the parquet shards and decodes an image when it is looked up (errors name the key and the shard).

    Example:
        ```python
        >>> images = load_images_table("demo_output/preference/dataset")  # doctest: +SKIP
        >>> images["u0-p0-a"]  # doctest: +SKIP
        ```
    """
    root = resolve(path_or_repo_id, repo_type="dataset")
    files = shard_files(root / "images", "images")
    if not files:
        raise FileNotFoundError(f"{root} has no images/images-*.parquet shards.")
    return ImageStore(files)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(tmp: Path, name: str, examples: Iterable[PreferenceExample], max_rows: int) -> dict[str, int]:
    users = set()
    with ShardedParquetWriter(tmp / "pairs", name, PAIRS_SCHEMA, max_rows) as writer:
        chunk = []
        for e in examples:
            chunk.append(e.to_row())
            users.add(e.user_id)
            if len(chunk) == 1024:
                writer.write_rows(chunk)
                chunk = []
        writer.write_rows(chunk)
    return {"examples": writer.num_rows, "users": len(users)}


def _render_dataset_card(
    tmp: Path,
    splits: Sequence[str],
    counts,
    source: str,
    has_images: bool,
    issues,
    source_dataset: str | None,
    license: str | None,
) -> None:
    source_repo = hub_repo_id(source_dataset)
    card = render_card(
        "preference_card.md",
        kind="dataset",
        license={"license": license} if license else card_license(source_dataset, repo_type="dataset"),
        size_category=size_category(sum(c["examples"] for c in counts.values())),
        source_datasets=[source_repo] if source_repo else [],
        splits=list(splits),
        counts=counts,
        source=source,
        has_images=has_images,
        issues=dict(sorted(issues.counts.items())),
        config={},
        metrics={},
    )
    (tmp / "README.md").write_text(card, encoding="utf-8")


def save_preference_dataset(
    splits: Mapping[str, Sequence[PreferenceExample]],
    output_dir: str | os.PathLike,
    images: Mapping[str, Image.Image] | None = None,
    source: str = "Pick-a-Pic v2",
    overwrite: bool = False,
    max_pairs_per_shard: int = MAX_PAIRS_PER_SHARD,
    max_images_per_shard: int = MAX_IMAGES_PER_SHARD,
    source_dataset: str | None = None,
    license: str | None = None,
) -> Path:
    """Write a Hub-shaped dataset folder: `pairs/<split>-XXXXX-of-YYYYY.parquet` (published format), optionally
    `images/images-XXXXX-of-YYYYY.parquet` (`key`, encoded `image` bytes), and a card whose YAML lists the configs.

    `images` may be PIL images (written as PNG) or an `ImageStore` (its bytes are copied, not re-encoded); every
    image it holds is written, and every image the examples use must be among them.

    Args:
        splits: `{split: examples}`.
        output_dir: The folder (written atomically).
        images: Image key → image, or None to leave the pixels out.
        source: Where the records came from (for the card).
        overwrite: Replace an existing folder.
        max_pairs_per_shard: Example rows per `pairs` shard.
        max_images_per_shard: Images per `images` shard.
        source_dataset: Hub id of the dataset the records came from (e.g. `"yuvalkirstain/pickapic_v2"`): the
            card lists it in `source_datasets` and repeats its license when its card is in the local Hub cache.
        license: The card's license (a Hub license id); by default the source dataset's, else `other`.

    Raises:
        MissingImageError: An example uses an image that `images` lacks (names the user and the image).

    Example:
        ```python
        >>> save_preference_dataset(splits, "out/pickapic-users", images)  # doctest: +SKIP
        ```
    """
    counts = {}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        for name, examples in splits.items():
            counts[name] = _write_split(tmp, name, examples, max_pairs_per_shard)
        if images is not None:
            user_of = {}
            for examples in splits.values():
                for e in examples:
                    for key in (e.image0, e.image1, *(k for r in e.references for k in r[:2])):
                        user_of.setdefault(key, e.user_id)
            items = images.items_encoded() if isinstance(images, ImageStore) else images.items()
            with ShardedParquetWriter(tmp / "images", "images", IMAGES_SCHEMA, max_images_per_shard) as writer:
                rows = []
                for key, image in tqdm(items, total=len(images), desc="images", leave=False):
                    rows.append({"key": str(key), "image": image if isinstance(image, bytes) else _png(image)})
                    user_of.pop(str(key), None)
                    if len(rows) == 64:
                        writer.write_rows(rows)
                        rows = []
                writer.write_rows(rows)
            if user_of:
                key, user = next(iter(user_of.items()))
                raise MissingImageError(
                    f"{len(user_of)} images used by the examples are not in `images`, e.g. {key!r} (user {user}). "
                    "Pass every image the splits use."
                )
        _render_dataset_card(
            tmp, list(splits), counts, source, images is not None, DataIssues(), source_dataset, license
        )
    return Path(output_dir)


@dataclass
class PreferenceDatasetSummary:
    """What `build_preference_dataset` wrote.

    Attributes:
        path: The dataset folder.
        counts: `{split: {"examples": n, "users": n}}`.
        issues: Quarantined images and pairs, dropped or shortened examples, with counts.
    """

    path: Path
    counts: dict[str, dict[str, int]]
    issues: DataIssues


BAD_IMAGE = "images without usable bytes (quarantined)"
BAD_PAIRS = "pairs showing a quarantined image (dropped)"


def _first_bad_label(table: pa.Table, labels: list) -> None:
    for i, value in enumerate(labels):
        if value is None or isinstance(value, str) or float(value) not in (0.0, 0.5, 1.0):
            record_label(table.slice(i, 1).to_pylist()[0])


def _normalised_records(path: Path, image_bytes_columns: Sequence[str] | None) -> pa.Table:
    """Records as string keys and a float `label_0` in {0, 0.5, 1} (anything else raises, naming the user)."""
    table = _records_table(path, image_bytes_columns)
    for column in ("user_id", "image_0", "image_1"):
        nulls = table[column].null_count
        if nulls:
            row = table.filter(pc.is_null(table[column])).slice(0, 1).to_pylist()[0]
            raise ValueError(f"{path}: {nulls} records have no {column}, e.g. {row}.")
    try:
        labels = pc.cast(table["label_0"], pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        _first_bad_label(table, table["label_0"].to_pylist())
        raise
    valid = pc.fill_null(pc.is_in(labels, value_set=pa.array([0.0, 0.5, 1.0])), False)
    if not pc.all(valid).as_py():
        _first_bad_label(table, labels.to_pylist())
    strings = {c: pc.cast(table[c], pa.string()) for c in ("user_id", "image_0", "image_1")}
    return pa.table({**strings, "label_0": labels, "caption": table["caption"]})


def _liked_table(records: pa.Table) -> pa.Table:
    """Non-tied records as `user_id, liked, disliked, caption`."""
    pairs = records.filter(pc.not_equal(records["label_0"], 0.5))
    won = pc.equal(pairs["label_0"], 1.0)
    return pa.table(
        {
            "user_id": pairs["user_id"],
            "liked": pc.if_else(won, pairs["image_0"], pairs["image_1"]),
            "disliked": pc.if_else(won, pairs["image_1"], pairs["image_0"]),
            "caption": pairs["caption"],
        }
    )


def _eligible(pairs: pa.Table, min_liked: int) -> pa.Array:
    counts = pairs.group_by("user_id").aggregate([("liked", "count_distinct")])
    return counts.filter(pc.greater_equal(counts["liked_count_distinct"], min_liked))["user_id"].combine_chunks()


def _copy_valid_images(
    path: Path, image_bytes_columns: Sequence[str], needed: pa.Array, writer: ShardedParquetWriter
) -> dict[str, str]:
    """Stream the records file once: decode every needed image (first occurrence) and copy the good ones' bytes to
    `writer`. Returns the needed images that are missing or cannot be decoded, with the reason."""
    order = np.argsort(np.fromiter((key_hash(k) for k in needed.to_pylist()), np.int64, count=len(needed)))
    needed = needed.take(pa.array(order))
    hashes = np.fromiter((key_hash(k) for k in needed.to_pylist()), np.int64, count=len(needed))
    done = np.zeros(len(needed), dtype=bool)
    bad: dict[str, str] = {}
    columns = ["image_0", "image_1", *image_bytes_columns]
    with pq.ParquetFile(path) as parquet, tqdm(total=len(needed), desc="checking images", leave=False) as bar:
        for batch in iter_file_batches(parquet, columns, batch_size=64):
            rows = []
            for key_column, bytes_column in zip(("image_0", "image_1"), image_bytes_columns, strict=True):
                keys, blobs = batch.column(key_column).to_pylist(), batch.column(bytes_column)
                for key, blob in zip(keys, blobs, strict=True):
                    key = str(key)
                    h = key_hash(key)
                    lo, hi = np.searchsorted(hashes, h, "left"), np.searchsorted(hashes, h, "right")
                    slot = next((j for j in range(lo, hi) if needed[j].as_py() == key), None)
                    if slot is None or done[slot]:
                        continue
                    done[slot] = True
                    bar.update()
                    data = blob.as_py()
                    try:
                        decode_image(data)
                    except CorruptImageError as err:
                        bad[key] = str(err)
                        continue
                    rows.append({"key": key, "image": data})
            writer.write_rows(rows)
    for j in np.flatnonzero(~done):
        bad[needed[int(j)].as_py()] = "not in the records file's image columns"
    return bad


def build_preference_dataset(
    records: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_bytes_columns: Sequence[str] | None = None,
    min_liked: int = 11,
    n_ref: int = 8,
    val_users: int = 89,
    test_users: int = 70,
    seen_users: int = 70,
    seen_pairs_per_user: int = 2,
    seed: int = 0,
    source: str | None = None,
    overwrite: bool = False,
    max_pairs_per_shard: int = MAX_PAIRS_PER_SHARD,
    max_images_per_shard: int = MAX_IMAGES_PER_SHARD,
    source_dataset: str | None = None,
    license: str | None = None,
) -> PreferenceDatasetSummary:
    """Build the per-user dataset of paper 003 from a Pick-a-Pic-v2-style records file, streaming, into a
    Hub-shaped folder of sharded parquet (the same examples as `build_user_splits` on the same records).

    Memory holds the records' key/label/caption columns as Arrow (~100 bytes a pair), one user's examples and one
    row group of images, never the images. The image bytes are read in one streaming pass that decodes each image
    of the eligible users once: an image that is missing or cannot be decoded is **quarantined** (left out of the
    images table) and every pair showing it is dropped before the split; users then below `min_liked` are dropped.
    The counts (and the first images and users affected) are warned, written into the card and returned.

    Args:
        records: Parquet (or JSON-lines, without image bytes) with `user_id, image_0, image_1, label_0, caption`.
        output_dir: The dataset folder (written atomically).
        image_bytes_columns: The encoded-image columns of `image_0`/`image_1` (Pick-a-Pic: `jpg_0`, `jpg_1`); None
            writes no images table (and checks no image).
        min_liked, n_ref, val_users, test_users, seen_users, seen_pairs_per_user, seed: As in `build_user_splits`.
        source: Where the records came from (for the card; default the file name).
        overwrite: Replace an existing folder.
        max_pairs_per_shard: Example rows per `pairs` shard.
        max_images_per_shard: Images per `images` shard.
        source_dataset, license: As in `save_preference_dataset` (the card's `source_datasets` and license).

    Returns:
        A `PreferenceDatasetSummary`.

    Raises:
        ValueError: A label outside {0, 0.5, 1} or a record without user/image key (naming the user), or too few
            eligible users.

    Example:
        ```python
        >>> summary = build_preference_dataset("pickapic.parquet", "out/users", ("jpg_0", "jpg_1"))  # doctest: +SKIP
        >>> summary.counts["test_unseen"]  # doctest: +SKIP
        ```
    """
    path = Path(records)
    table = _normalised_records(path, image_bytes_columns)
    pairs = _liked_table(table)
    issues = DataIssues()
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        if image_bytes_columns:
            candidates = _eligible(pairs, min_liked)
            mine = table.filter(pc.is_in(table["user_id"], value_set=candidates))
            needed = pc.unique(pa.chunked_array(mine["image_0"].chunks + mine["image_1"].chunks, pa.string()))
            with ShardedParquetWriter(tmp / "images", "images", IMAGES_SCHEMA, max_images_per_shard) as writer:
                bad = _copy_valid_images(path, image_bytes_columns, needed, writer)
            for key, reason in bad.items():
                issues.add(BAD_IMAGE, f"{key!r}: {reason}")
            if bad:
                bad_keys = pa.array(list(bad), pa.string())
                shows_bad = pc.or_(pc.is_in(pairs["liked"], bad_keys), pc.is_in(pairs["disliked"], bad_keys))
                users_bad = pc.unique(pairs.filter(shows_bad)["user_id"]).to_pylist()
                issues.add(BAD_PAIRS, f"users {', '.join(users_bad[:5])}", int(pc.sum(shows_bad).as_py() or 0))
                pairs = pairs.filter(pc.invert(shows_bad))
        eligible = _eligible(pairs, min_liked)
        _check_enough(len(eligible), min_liked, val_users, test_users)
        roles = assign_user_roles(eligible.to_pylist(), val_users, test_users, seen_users, seed)
        pairs = pairs.filter(pc.is_in(pairs["user_id"], value_set=eligible))
        pairs = pairs.take(pc.sort_indices(pairs, [("user_id", "ascending")]))  # stable: a user's pairs keep order
        users = pairs["user_id"].combine_chunks()
        starts = [0, *(np.flatnonzero(pc.not_equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False)) + 1)]
        writers = {n: ShardedParquetWriter(tmp / "pairs", n, PAIRS_SCHEMA, max_pairs_per_shard) for n in SPLITS}
        split_users: dict[str, set[str]] = {name: set() for name in SPLITS}
        bounds = zip(starts, [*starts[1:], len(users)], strict=True)
        for start, stop in tqdm(bounds, total=len(starts), desc="users", leave=False):
            rows = pairs.slice(start, stop - start).to_pylist()
            user = UserPairs(rows[0]["user_id"], [(r["liked"], r["disliked"], as_prompt(r["caption"])) for r in rows])
            for name, examples in user_split_examples(
                user, roles[user.user_id], n_ref, seen_pairs_per_user, seed, issues
            ).items():
                writers[name].write_rows([e.to_row() for e in examples])
                if examples:
                    split_users[name].add(user.user_id)
        counts = {}
        for name, writer in writers.items():
            writer.close()
            counts[name] = {"examples": writer.num_rows, "users": len(split_users[name])}
        has_images = bool(image_bytes_columns)
        _render_dataset_card(tmp, SPLITS, counts, source or path.name, has_images, issues, source_dataset, license)
    issues.warn()
    return PreferenceDatasetSummary(Path(output_dir), counts, issues)


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

    Both targets of an example get the same references in the same order (shuffled when `shuffle_references`, as in
    paper 003's training). An example's order is drawn from `seed`, the epoch (`set_epoch`, which the trainer calls
    at the start of every epoch) and the example itself: it changes from epoch to epoch, and is the same in any
    batch, DataLoader worker or process of a distributed run, and after resuming from a checkpoint (whose epoch
    determines it). With `share_prefix` (default) the batch is a `PairBatch`: the
    references are encoded once per example and the two target turns on top of them; otherwise it holds `2 · B`
    full left-padded sequences (liked targets first). Either way the model returns the `B` liked targets' logits,
    then the `B` disliked ones, and `labels` is 1 for the first half and 0 for the second.

    An example with fewer than `n_ref` references uses the ones it has: such examples are counted in
    `short_reference_examples` and the first one is warned about. Image errors name the user and the image.

    Args:
        builder: The sequence builder of the model.
        load_image: Maps an image key to a PIL image (e.g. `images.__getitem__`).
        n_ref: References per example (the first `n_ref`).
        shuffle_references: Shuffle the reference turns of every example, anew in every epoch.
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
        self.seed = int(seed) % 2**64
        # Shared memory: DataLoader workers (persistent ones too) see the epoch the trainer sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.short_reference_examples = 0

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the reference orders of `epoch`."""
        self._epoch.fill_(int(epoch))

    def _order_rng(self, example: PreferenceExample) -> np.random.Generator:
        """The generator of `example`'s reference order in this epoch (keyed by the example's user and targets)."""
        key = "\0".join([example.user_id, example.image0, example.image1, example.prompt])
        return np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode())])

    def __call__(self, examples: Sequence[PreferenceExample]):
        examples = [e if isinstance(e, PreferenceExample) else PreferenceExample.from_row(e) for e in examples]
        short = [e for e in examples if len(e.references) < self.n_ref]
        if short and not self.short_reference_examples:
            warnings.warn(
                f"User {short[0].user_id}: an example has {len(short[0].references)} references, fewer than "
                f"n_ref={self.n_ref}; such examples use the references they have (counted in "
                "`short_reference_examples`).",
                stacklevel=2,
            )
        self.short_reference_examples += len(short)
        pos = [e.query(self.load_image, e.liked, self.n_ref) for e in examples]
        neg = [e.query(self.load_image, e.disliked, self.n_ref) for e in examples]
        orders = [None] * len(pos)
        if self.shuffle_references:
            orders = [self.builder.random_orders([pos[i]], self._order_rng(e))[0] for i, e in enumerate(examples)]
        if self.share_prefix:
            return build_pair_batch(self.builder, pos, neg, orders)
        return self.builder(pos + neg, orders=orders + orders, labels=[1] * len(pos) + [0] * len(neg))


def by_user(examples: Iterable[PreferenceExample]) -> dict[str, list[PreferenceExample]]:
    """Group examples by `user_id`, keeping their order."""
    grouped: dict[str, list[PreferenceExample]] = defaultdict(list)
    for e in examples:
        grouped[e.user_id].append(e)
    return dict(grouped)


def _records_table(path: Path, image_bytes_columns: Sequence[str] | None) -> pa.Table:
    """The record columns (no image bytes) of a parquet or JSON-lines records file, as an Arrow table."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    json = path.suffix in (".jsonl", ".json")
    if json and image_bytes_columns:
        raise ValueError(f"{path}: image bytes columns need a parquet records file (JSON cannot hold bytes).")
    names = pd.read_json(path, lines=True, nrows=1).columns if json else pq.read_schema(path).names
    missing = [c for c in [*RECORD_COLUMNS, *(image_bytes_columns or [])] if c not in names]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; it has {list(names)}.")
    if json:
        return pa.Table.from_pandas(pd.read_json(path, lines=True)[list(RECORD_COLUMNS)], preserve_index=False)
    return pq.read_table(path, columns=list(RECORD_COLUMNS))


def read_records(path: str | os.PathLike, image_bytes_columns: tuple[str, str] | None = None):
    """Read Pick-a-Pic-v2-style records from a parquet or JSON-lines file.

    Args:
        path: The file; needs the columns `user_id, image_0, image_1, label_0, caption` (image columns hold keys,
            e.g. Pick-a-Pic's `image_0_uid`/`image_1_uid` renamed).
        image_bytes_columns: Columns holding the encoded images of `image_0`/`image_1` (Pick-a-Pic: `jpg_0`,
            `jpg_1`); None leaves the pixels out.

    Returns:
        `(records, images)`: the records as dicts, and an `ImageStore` over the file's image bytes (decoded on
        access; empty dict without `image_bytes_columns`). For a large file use `build_preference_dataset`, which
        streams.

    Example:
        ```python
        >>> records, images = read_records("pickapic_v2_train.parquet", ("jpg_0", "jpg_1"))  # doctest: +SKIP
        ```
    """
    path = Path(path)
    records = _records_table(path, image_bytes_columns).to_pylist()
    if not image_bytes_columns:
        return records, {}
    return records, ImageStore([path], ("image_0", "image_1"), tuple(image_bytes_columns))


def load_preference_dataset(path_or_repo_id: str | os.PathLike):
    """Every split of a folder (or Hub repo) written by `save_preference_dataset`, and its images, both lazy.

    Returns:
        `(splits, images)`: `{split: PreferenceSplit}` (examples read on demand) and an `ImageStore` (images decoded
        on access; an empty dict when the folder has no `images/`).

    Example:
        ```python
        >>> splits, images = load_preference_dataset("demo_output/preference/dataset")  # doctest: +SKIP
        ```
    """
    root = resolve(path_or_repo_id, repo_type="dataset")
    names = sorted({f.name.split("-")[0].removesuffix(".parquet") for f in (root / "pairs").glob("*.parquet")})
    if not names:
        raise FileNotFoundError(f"{root} has no pairs/*.parquet; build it with `imagegem preference build`.")
    splits = {name: PreferenceSplit(_split_files(root, name)) for name in names}
    images = load_images_table(root) if shard_files(root / "images", "images") else {}
    return splits, images
