"""Preference pairs for Diffusion-DPO: validation of a pair dataset and the batch collator.

Two layouts are accepted: the de-facto exchange format of Pick-a-Pic (`jpg_0`, `jpg_1`, `label_0`, `caption`;
`label_0 = 1` means `jpg_0` is preferred, 0.5 a tie) and ImageGem's `preference_pairs` with pixels (`chosen`,
`rejected`, `prompt`). Images may be encoded bytes, `{"bytes": ...}` dicts (a `datasets.Image` column read with
`decode=False`) or PIL images.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from typing import Any

import numpy as np
import torch
from PIL import Image

_PROBLEMS = ("tie", "missing image", "unreadable image", "identical images", "empty prompt")


def _image_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        return value.get("bytes")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"Unsupported image value of type {type(value).__name__}; expected bytes or a PIL image.")


def to_pil(value: Any) -> Image.Image:
    """Decode an image value (bytes, `{"bytes": ...}` or PIL) to an RGB PIL image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data = _image_bytes(value)
    if data is None:
        raise ValueError("Missing image.")
    return Image.open(io.BytesIO(data)).convert("RGB")


def _winner_loser_caption(row: dict[str, Any]) -> tuple[Any, Any, Any, float | None]:
    if "jpg_0" in row:
        label = row.get("label_0")
        if label is None:
            return row["jpg_0"], row["jpg_1"], row.get("caption"), None
        if label == 0.5:
            return row["jpg_0"], row["jpg_1"], row.get("caption"), 0.5
        first_wins = float(label) > 0.5
        winner, loser = (row["jpg_0"], row["jpg_1"]) if first_wins else (row["jpg_1"], row["jpg_0"])
        return winner, loser, row.get("caption"), float(label)
    return row.get("chosen"), row.get("rejected"), row.get("prompt"), 1.0


def _checked_pair(row: dict[str, Any]) -> tuple[str | None, str, bytes, bytes]:
    """`(problem, caption, winner bytes, loser bytes)` of one row; `problem` is None for a trainable pair."""
    winner, loser, caption, label = _winner_loser_caption(row)
    if label is None or label == 0.5:
        return "tie", "", b"", b""
    if not caption or not str(caption).strip():
        return "empty prompt", "", b"", b""
    blobs = []
    for value in (winner, loser):
        data = _image_bytes(value)
        if data is None:
            return "missing image", "", b"", b""
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception:
            return "unreadable image", "", b"", b""
        blobs.append(data)
    if blobs[0] == blobs[1]:
        return "identical images", "", b"", b""
    return None, str(caption), blobs[0], blobs[1]


def prepare_dpo_dataset(dataset, num_proc: int | None = None):
    """Keep the trainable pairs of `dataset` and put them in one layout: `caption`, `image_w`, `image_l` (bytes).

    Dropped (and counted, by reason): ties (`label_0 = 0.5`) and missing labels, empty captions (use
    `proportion_empty_prompts` for unconditional training instead), missing or unreadable images, and pairs whose
    two images are byte-identical.

    Args:
        dataset: A `datasets.Dataset` in the exchange format or ImageGem's `preference_pairs` layout with pixels
            (decode the image columns lazily: `dataset.cast_column("jpg_0", Image(decode=False))`, or keep bytes).
        num_proc: Processes for the validation pass.

    Returns:
        `(dataset, dropped)`: the prepared `datasets.Dataset` and a `{reason: count}` dict.

    Raises:
        ValueError: If the dataset has neither layout, or no pair survives.

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
    columns = set(dataset.column_names)
    if not ({"jpg_0", "jpg_1", "label_0", "caption"} <= columns or {"chosen", "rejected", "prompt"} <= columns):
        raise ValueError(
            "A Diffusion-DPO dataset needs columns jpg_0, jpg_1, label_0, caption (exchange format) or chosen, "
            f"rejected, prompt (ImageGem preference_pairs with pixels); got {sorted(columns)}."
        )

    def normalise(row: dict[str, Any]) -> dict[str, Any]:
        problem, caption, winner, loser = _checked_pair(row)
        return {"caption": caption, "image_w": winner, "image_l": loser, "_problem": problem or ""}

    checked = dataset.map(normalise, remove_columns=dataset.column_names, num_proc=num_proc, desc="Checking pairs")
    counts = Counter(checked["_problem"])
    dropped = {reason: counts[reason] for reason in _PROBLEMS if counts.get(reason)}
    kept = checked.filter(lambda problem: problem == "", input_columns="_problem").remove_columns("_problem")
    if len(kept) == 0:
        raise ValueError(f"No trainable pair left out of {len(dataset)} (dropped: {dropped}).")
    return kept, dropped


def _resize_and_crop(image: Image.Image, resolution: int, rng: random.Random | None) -> tuple[np.ndarray, int, int]:
    """Shorter side → `resolution` (bicubic), then a square crop (center, or random when `rng`); returns the
    pixels in [−1, 1] as CHW and the crop's top-left."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    if rng is None:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return pixels.transpose(2, 0, 1) / 127.5 - 1.0, top, left


class DiffusionDPOCollator:
    """Turns prepared pairs (`caption`, `image_w`, `image_l`) into a Diffusion-DPO batch.

    Both images of a pair are resized to `resolution` on their shorter side and cropped to a square with the same
    offsets rule, so pairs of different sizes or aspect ratios batch together. SDXL size conditioning
    (`add_time_ids`) uses the winner's original size and crop.

    Args:
        tokenizer: The (first) CLIP tokenizer.
        resolution: Square training resolution.
        tokenizer_2: SDXL's second tokenizer (adds `input_ids_2` and `add_time_ids` to the batch).
        proportion_empty_prompts: Probability of replacing a caption with `""`.
        random_crop: Random crops instead of center crops.
        seed: Seed of the empty-prompt and crop draws.

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
    ):
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.resolution = resolution
        self.proportion_empty_prompts = proportion_empty_prompts
        self.random_crop = random_crop
        self.rng = random.Random(seed)

    def _tokenize(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, time_ids, captions = [], [], []
        for row in rows:
            pair = []
            for key in ("image_w", "image_l"):
                image = to_pil(row[key])
                array, top, left = _resize_and_crop(image, self.resolution, self.rng if self.random_crop else None)
                pair.append(array)
                if key == "image_w":
                    time_ids.append([image.height, image.width, top, left, self.resolution, self.resolution])
            pixels.append(np.stack(pair))
            empty = self.proportion_empty_prompts > 0 and self.rng.random() < self.proportion_empty_prompts
            captions.append("" if empty else row["caption"])
        batch = {
            "pixel_values": torch.from_numpy(np.stack(pixels)),
            "input_ids": self._tokenize(self.tokenizer, captions),
        }
        if self.tokenizer_2 is not None:
            batch["input_ids_2"] = self._tokenize(self.tokenizer_2, captions)
            batch["add_time_ids"] = torch.tensor(time_ids, dtype=torch.float32)
        return batch
