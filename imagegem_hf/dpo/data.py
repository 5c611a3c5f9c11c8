"""Preference pairs for Diffusion-DPO: validation of a pair dataset and the batch collator.

Three layouts are accepted: the de-facto exchange format of Pick-a-Pic (`jpg_0`, `jpg_1`, `label_0`, `caption`;
`label_0 = 1` means `jpg_0` is preferred, 0 that `jpg_1` is, 0.5 a tie), ImageGem's `preference_pairs` with pixels
(`chosen`, `rejected`, `prompt`) and the prepared layout (`caption`, `image_w`, `image_l`, winner first). Images may
be encoded bytes, `{"bytes": ...}` / `{"path": ...}` dicts (a `datasets.Image` column read with `decode=False`),
file paths or PIL images.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

LAYOUTS: dict[str, tuple[str, ...]] = {
    "exchange": ("jpg_0", "jpg_1", "label_0", "caption"),
    "preference_pairs": ("chosen", "rejected", "prompt"),
    "prepared": ("caption", "image_w", "image_l"),
}
_IMAGE_COLUMNS = {
    "exchange": ("jpg_0", "jpg_1"),
    "preference_pairs": ("chosen", "rejected"),
    "prepared": ("image_w", "image_l"),
}
# Problems that drop a pair (counted in `dropped`), in report order.
_DROPPED = ("tie", "missing label", "missing image", "unreadable image", "identical images", "empty prompt")
# Problems that stop preparation: the dataset is not what its layout says (wrong label convention, wrong types).
_REFUSED = {
    "invalid label": "label_0 must be a number in [0, 1] (1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: tie)",
    "invalid caption": "a caption must be a string or a list of strings (the first non-empty one is used)",
    "invalid image": "an image must be bytes, a {'bytes': ...} or {'path': ...} dict, a file path or a PIL image",
}


def _image_bytes(value: Any) -> bytes | None:
    """Encoded bytes of an image value; `None` when it is missing; `TypeError` for an unsupported type."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value) or None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        return _image_bytes(value.get("path") or None)
    if isinstance(value, str | Path):
        try:
            return Path(value).read_bytes()
        except OSError:
            return None
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def to_pil(value: Any) -> Image.Image:
    """Decode an image value (bytes, `{"bytes": ...}`/`{"path": ...}`, a path or PIL) to an RGB PIL image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data = _image_bytes(value)
    if data is None:
        raise ValueError("Missing image.")
    return Image.open(io.BytesIO(data)).convert("RGB")


def _decodes(data: bytes) -> bool:
    """Whether the image decodes completely (`Image.verify` does not decode, so it passes truncated JPEGs)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return False


def _caption(value: Any) -> str | None:
    """The caption to train on: a string, or the first non-empty string of a list; `None` for other types."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return next((item for item in value if item.strip()), "")
    return None


def _label(value: Any) -> float | None:
    """`label_0` as a float in [0, 1]; `None` when missing; `ValueError` when it is not a label."""
    if value is None:
        return None
    if isinstance(value, bool | numbers.Real):
        label = float(value)
    elif isinstance(value, str):
        label = float(value)  # ValueError for text
    else:
        raise ValueError(f"unsupported label type {type(value).__name__}")
    if not (math.isfinite(label) and 0.0 <= label <= 1.0):
        raise ValueError(repr(label))
    return label


def _pair(row: dict[str, Any], layout: str) -> tuple[Any, Any, Any, Any]:
    """`(first image, second image, raw caption, raw label)` of a row; label 1 means the first image won."""
    if layout == "exchange":
        return row.get("jpg_0"), row.get("jpg_1"), row.get("caption"), row.get("label_0")
    if layout == "preference_pairs":
        return row.get("chosen"), row.get("rejected"), row.get("prompt"), 1.0
    return row.get("image_w"), row.get("image_l"), row.get("caption"), 1.0


class _RowChecker:
    """`datasets.map` function: the problem of a row (`""` for a trainable pair), its caption and winner side."""

    def __init__(self, layout: str):
        self.layout = layout

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        out = {"caption": "", "winner_first": True, "_row": index, "_problem": "", "_detail": ""}
        first, second, raw_caption, raw_label = _pair(row, self.layout)
        try:
            label = _label(raw_label)
        except ValueError:
            return {**out, "_problem": "invalid label", "_detail": repr(raw_label)[:60]}
        caption = _caption(raw_caption)
        if caption is None:
            return {**out, "_problem": "invalid caption", "_detail": type(raw_caption).__name__}
        if label is None:
            return {**out, "_problem": "missing label"}
        if label == 0.5:
            return {**out, "_problem": "tie"}
        if not caption.strip():
            return {**out, "_problem": "empty prompt"}
        blobs = []
        for value in (first, second):
            try:
                data = _image_bytes(value)
            except TypeError as error:
                return {**out, "_problem": "invalid image", "_detail": str(error)}
            if data is None:
                return {**out, "_problem": "missing image"}
            if not _decodes(data):
                return {**out, "_problem": "unreadable image"}
            blobs.append(data)
        if blobs[0] == blobs[1]:
            return {**out, "_problem": "identical images"}
        return {**out, "caption": caption, "winner_first": label > 0.5}


class _PairRows:
    """Formatting transform of a prepared dataset: its rows (`caption`, `winner_first`, `_row`) become
    `caption, image_w, image_l` with the images read from the source dataset, so that preparation stores no
    second copy of the images."""

    def __init__(self, source, layout: str):
        self.source = source
        self.layout = layout

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if "_row" not in batch:
            return {key: value for key, value in batch.items() if key not in ("winner_first", "_row")}
        if not batch["_row"]:
            return {"caption": [], "image_w": [], "image_l": []}
        first_key, second_key = _IMAGE_COLUMNS[self.layout]
        rows = self.source[list(batch["_row"])]
        pairs = zip(rows[first_key], rows[second_key], batch["winner_first"], strict=True)
        winners, losers = zip(*((a, b) if first else (b, a) for a, b, first in pairs), strict=True)
        return {"caption": list(batch["caption"]), "image_w": list(winners), "image_l": list(losers)}


class _StreamRow:
    """`IterableDataset.map` function: a checked row in the prepared layout, or a `ValueError` for a refused one."""

    def __init__(self, layout: str):
        self.layout = layout
        self.checker = _RowChecker(layout)

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        checked = self.checker(row, index)
        problem = checked["_problem"]
        if problem in _REFUSED:
            raise ValueError(f"Row {index} of the pair stream: {problem} ({checked['_detail']}); {_REFUSED[problem]}.")
        first, second, _, _ = _pair(row, self.layout)
        winner, loser = (first, second) if checked["winner_first"] else (second, first)
        return {"caption": checked["caption"], "image_w": winner, "image_l": loser, "_problem": problem}


def _trainable(problem: str) -> bool:
    return problem == ""


def _layout(columns: set[str]) -> str:
    for name, required in LAYOUTS.items():
        if set(required) <= columns:
            return name
    raise ValueError(
        "A Diffusion-DPO dataset needs columns jpg_0, jpg_1, label_0, caption (exchange format), chosen, rejected, "
        "prompt (ImageGem preference_pairs with pixels) or caption, image_w, image_l (prepared); "
        f"got {sorted(columns)}."
    )


def _format(dataset) -> tuple[str | None, Any]:
    """`(format type, formatting transform)` of a `datasets.Dataset` (`(None, None)` for other datasets)."""
    form = getattr(dataset, "format", None)
    if not isinstance(form, dict):
        return None, None
    return form.get("type"), (form.get("format_kwargs") or {}).get("transform")


def _columns(dataset) -> set[str]:
    """The columns a row of `dataset` has (from its first row when a transform or a lazy map hides them)."""
    names = dataset.column_names
    if names is None or _format(dataset)[0] == "custom":
        first = next(iter(dataset), None)
        return set(first) if first is not None else set(names or ())
    return set(names)


def _undecoded(dataset, layout: str):
    """`dataset` with its `datasets.Image` columns read as bytes (a schema change only: nothing is copied)."""
    from datasets import Image as ImageFeature

    features = dataset.features or {}
    for column in _IMAGE_COLUMNS[layout]:
        feature = features.get(column)
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(row) for row in rows[:5])
    return f"row{'s' if len(rows) > 1 else ''} {shown}{', ...' if len(rows) > 5 else ''}"


def prepare_dpo_dataset(dataset, num_proc: int | None = None):
    """Validate a pair dataset and present its trainable pairs in one layout: `caption`, `image_w`, `image_l`.

    Dropped (counted by reason, and the rows named in a warning): ties (`label_0 = 0.5`), missing labels, empty
    captions (use `proportion_empty_prompts` for unconditional training instead), missing images, images that do
    not decode completely (a truncated JPEG), and pairs whose two images are byte-identical. Refused with a
    `ValueError` naming the rows: labels that are not numbers in [0, 1] (NaN, 2.0, −1.0: another label convention),
    captions that are neither strings nor lists of strings, and image values of other types. A list of captions
    (several per pair) trains on its first non-empty caption.

    A `datasets.Dataset` is checked in one pass (`num_proc` processes) that writes only the small columns; the
    result is a view of the input's rows (its images are read from `dataset` when a row is accessed, never
    copied). A streaming `datasets.IterableDataset` is checked lazily as it is read: the same rows are dropped or
    refused, and `dropped` is empty because the counts are not known before the stream is read.

    Args:
        dataset: A `datasets.Dataset` or `datasets.IterableDataset` in the exchange format, ImageGem's
            `preference_pairs` layout with pixels, or the prepared layout. `datasets.Image` columns are read
            undecoded (as bytes); the collator decodes them.
        num_proc: Processes for the validation pass (`datasets.Dataset` only).

    Returns:
        `(dataset, dropped)`: the prepared dataset (rows `caption, image_w, image_l`; a `datasets.Dataset` keeps
        only the small columns `caption, winner_first, _row` and reads the images of a row from the input) and a
        `{reason: count}` dict.

    Raises:
        ValueError: If the dataset has none of the layouts, has refused rows, or no pair survives.

    Example:
        ```python
        >>> from datasets import Dataset
        >>> from imagegem_hf.dpo.data import prepare_dpo_dataset
        >>> pairs, dropped = prepare_dpo_dataset(Dataset.from_dict(
        ...     {"jpg_0": [png_a, png_a], "jpg_1": [png_b, png_b], "label_0": [0.0, 0.5], "caption": ["a", "b"]}
        ... ))  # doctest: +SKIP
        >>> dropped  # doctest: +SKIP
        {'tie': 1}
        ```
    """
    from datasets import IterableDataset

    format_type, transform = _format(dataset)
    if isinstance(transform, _PairRows):
        return dataset, {}  # the output of this function: already checked
    columns = _columns(dataset)
    layout = _layout(columns)
    if format_type not in (None, "custom"):
        dataset = dataset.with_format(None)  # python objects, not tensors
    if format_type != "custom":
        dataset = _undecoded(dataset, layout)
    if isinstance(dataset, IterableDataset):
        prepared = dataset.map(_StreamRow(layout), with_indices=True, remove_columns=sorted(columns))
        return prepared.filter(_trainable, input_columns="_problem").remove_columns("_problem"), {}

    checked = dataset.map(
        _RowChecker(layout),
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="Checking pairs",
    )
    problems = checked["_problem"][:]
    by_problem: dict[str, list[int]] = {}
    for row, problem in enumerate(problems):
        if problem:
            by_problem.setdefault(problem, []).append(row)
    for problem, rows in by_problem.items():
        if problem in _REFUSED:
            details = checked.select(rows[:5])["_detail"][:]
            raise ValueError(
                f"{len(rows)} of {len(dataset)} pairs have an {problem}: {_rows_text(rows)} "
                f"({', '.join(details)}); {_REFUSED[problem]}. Fix or remove these rows."
            )
    counts = Counter(problems)
    dropped = {reason: counts[reason] for reason in _DROPPED if counts.get(reason)}
    kept = [row for row, problem in enumerate(problems) if not problem]
    if not kept:
        raise ValueError(f"No trainable pair left out of {len(dataset)} (dropped: {dropped}).")
    if dropped:
        reasons = "; ".join(
            f"{reason} ×{len(by_problem[reason])} ({_rows_text(by_problem[reason])})" for reason in dropped
        )
        logger.warning("Dropped %d of %d pairs: %s.", len(dataset) - len(kept), len(dataset), reasons)
    prepared = checked.select(kept).remove_columns(["_problem", "_detail"])
    return prepared.with_transform(_PairRows(dataset, layout)), dropped


def _pair_key(row: dict[str, Any]) -> list[int]:
    """Entropy words identifying a pair by its content: CRC-32 of the caption, and length and CRC-32 of each image
    (CRC-32 reads 2.4 GB/s, four times BLAKE2b: this costs the collator about 2%)."""
    words = [zlib.crc32(str(row.get("caption", "")).encode())]
    for key in ("image_w", "image_l"):
        value = row.get(key)
        data = value.tobytes() if isinstance(value, Image.Image) else _image_bytes(value) or b""
        words += [len(data), zlib.crc32(data)]
    return words


class DiffusionDPOCollator:
    """Turns prepared pairs (`caption`, `image_w`, `image_l`) into a Diffusion-DPO batch.

    As in the diffusers Diffusion-DPO scripts, a loser whose size differs from its winner's is first resized to the
    winner's size; then both images of a pair go through the same transform: shorter side resized to `resolution`
    (bicubic), the same square crop (center, or random with `random_crop`) and the same random horizontal flip
    (`random_flip`). SDXL size conditioning (`add_time_ids`) is the winner's original size, the crop's top-left and
    the target size, valid for both images.

    The random draws of a pair (empty prompt, crop, flip, and `noise_seeds`: the seed of the model's VAE sample,
    noise and timestep for the pair) are a function of `seed`, the epoch (`set_epoch`) and the pair's content only:
    they are the same in any DataLoader worker, on whichever process of a distributed run handles the pair, after
    resuming from a checkpoint (whose seed and epoch determine them) and in any batch composition, and they change
    from epoch to epoch.

    Args:
        tokenizer: The (first) CLIP tokenizer.
        resolution: Square training resolution.
        tokenizer_2: SDXL's second tokenizer (adds `input_ids_2` and `add_time_ids` to the batch).
        proportion_empty_prompts: Probability of replacing a caption with `""`.
        random_crop: Random instead of center crops.
        seed: Seed of the random draws.
        random_flip: Flip each pair horizontally with probability 0.5.

    Example:
        ```python
        >>> from imagegem_hf.dpo import DiffusionDPOCollator
        >>> from imagegem_hf.testing import tiny_clip_tokenizer
        >>> collator = DiffusionDPOCollator(tiny_clip_tokenizer(), resolution=32)
        >>> batch = collator([{"caption": "a dog", "image_w": png_w, "image_l": png_l}])  # doctest: +SKIP
        >>> batch["pixel_values"].shape  # doctest: +SKIP
        torch.Size([1, 2, 3, 32, 32])
        ```
    """

    def __init__(
        self,
        tokenizer,
        resolution: int,
        tokenizer_2=None,
        proportion_empty_prompts: float = 0.0,
        random_crop: bool = False,
        seed: int = 0,
        random_flip: bool = False,
    ):
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.resolution = resolution
        self.proportion_empty_prompts = proportion_empty_prompts
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = int(seed) % 2**64
        # Shared memory: DataLoader workers (persistent ones too) see the epoch the trainer sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the random draws of `epoch` (the trainer calls it at the start of every epoch)."""
        self._epoch.fill_(int(epoch))

    def without_augmentation(self) -> DiffusionDPOCollator:
        """The same collator with no empty prompts, center crops and no flips (for evaluation)."""
        return DiffusionDPOCollator(self.tokenizer, self.resolution, tokenizer_2=self.tokenizer_2, seed=self.seed)

    def _tokenize(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def _pair_pixels(self, row: dict[str, Any], rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
        images = []
        for key in ("image_w", "image_l"):
            try:
                images.append(to_pil(row[key]))
            except Exception as error:
                raise ValueError(
                    f"The {key} of the pair {str(row.get('caption'))[:60]!r} does not decode ({error}); prepare the "
                    "dataset with prepare_dpo_dataset, which drops unreadable images."
                ) from error
        winner, loser = images
        if loser.size != winner.size:
            loser = loser.resize(winner.size, Image.BICUBIC)
        width, height = winner.size
        size = self.resolution
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        if self.random_crop and rng is not None:
            top, left = int(rng.integers(0, new_h - size + 1)), int(rng.integers(0, new_w - size + 1))
        else:
            top, left = (new_h - size) // 2, (new_w - size) // 2
        flip = self.random_flip and rng is not None and rng.random() < 0.5
        pixels = []
        for image in (winner, loser):
            image = image.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + size, top + size))
            if flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            pixels.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        return np.stack(pixels), [height, width, top, left, size, size]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        augment = self.proportion_empty_prompts > 0 or self.random_crop or self.random_flip
        pixels, time_ids, captions, noise_seeds = [], [], [], []
        for row in rows:
            entropy = [self.seed, self.epoch, *_pair_key(row)]
            rng = np.random.default_rng(entropy) if augment else None
            empty = rng is not None and rng.random() < self.proportion_empty_prompts
            pair, ids = self._pair_pixels(row, rng)
            pixels.append(pair)
            time_ids.append(ids)
            captions.append("" if empty else row["caption"])
            # A stream of its own (one more entropy word), independent of which augmentations are on.
            noise_seeds.append(int(np.random.SeedSequence([*entropy, 1]).generate_state(1, np.uint64)[0] >> 1))
        batch = {
            "pixel_values": torch.from_numpy(np.stack(pixels)),
            "input_ids": self._tokenize(self.tokenizer, captions),
            "noise_seeds": torch.tensor(noise_seeds, dtype=torch.int64),
        }
        if self.tokenizer_2 is not None:
            batch["input_ids_2"] = self._tokenize(self.tokenizer_2, captions)
            batch["add_time_ids"] = torch.tensor(time_ids, dtype=torch.float32)
        return batch
