"""prepare_dpo_dataset and DiffusionDPOCollator on the inputs that used to slip through: truncated JPEGs, labels of
another convention, list captions, streams, the image copy in the cache, pairs of different sizes, flips and the
random draws of DataLoader workers and epochs."""

from __future__ import annotations

import io
import logging
from dataclasses import fields

import numpy as np
import pytest
import torch
from datasets import Dataset, load_dataset
from PIL import Image

from imagegem_hf.dpo import DiffusionDPOCollator, DiffusionDPOConfig, prepare_dpo_dataset
from imagegem_hf.testing import random_images, tiny_clip_tokenizer

from .test_dpo import _pairs, _png


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_a_truncated_jpeg_is_dropped_and_its_row_named(caplog):
    images = random_images(4, size=64, seed=0)
    jpegs = [_jpeg(image) for image in images]
    truncated = jpegs[2][: len(jpegs[2]) // 2]
    with Image.open(io.BytesIO(truncated)) as image:
        image.verify()  # what validation used to check: passes, although the image does not decode
    rows = {
        "jpg_0": [jpegs[0], truncated],
        "jpg_1": [jpegs[1], jpegs[3]],
        "label_0": [1.0, 0.0],
        "caption": ["a", "b"],
    }
    with caplog.at_level(logging.WARNING):
        prepared, dropped = prepare_dpo_dataset(Dataset.from_dict(rows))
    assert dropped == {"unreadable image": 1} and len(prepared) == 1
    assert "unreadable image ×1 (row 1)" in caplog.text


@pytest.mark.parametrize("bad", [float("nan"), 2.0, -1.0])
def test_labels_of_another_convention_are_refused(bad):
    pairs = _pairs(4).to_dict()
    pairs["label_0"] = [1.0, bad, 0.0, bad]
    with pytest.raises(ValueError, match=r"2 of 4 pairs have an invalid label: rows 1, 3 .*label_0 must be"):
        prepare_dpo_dataset(Dataset.from_dict(pairs))


def test_list_captions_train_on_their_first_caption_and_other_types_are_refused():
    pairs = _pairs(3).to_dict()
    pairs["caption"] = [["a dog", "a puppy"], ["", "a cat"], ["a car"]]
    prepared, _ = prepare_dpo_dataset(Dataset.from_dict(pairs))
    assert [row["caption"] for row in prepared] == ["a dog", "a cat", "a car"]
    with pytest.raises(ValueError, match="invalid caption: row 0"):
        prepare_dpo_dataset(Dataset.from_dict({**_pairs(1).to_dict(), "caption": [{"text": "a dog"}]}))


def test_preparation_writes_no_second_copy_of_the_images(tmp_path):
    n = 16
    images = random_images(2 * n, size=96, seed=1)
    pairs = Dataset.from_dict(
        {
            "jpg_0": [_png(im) for im in images[:n]],
            "jpg_1": [_png(im) for im in images[n:]],
            "label_0": [float(i % 2) for i in range(n)],
            "caption": [f"photo {i}" for i in range(n)],
        }
    )
    pairs.to_parquet(str(tmp_path / "pairs.parquet"))
    cache = tmp_path / "cache"
    source = load_dataset("parquet", data_files=str(tmp_path / "pairs.parquet"), split="train", cache_dir=str(cache))
    image_bytes = sum(len(b) for b in pairs["jpg_0"]) + sum(len(b) for b in pairs["jpg_1"])
    before = {path: path.stat().st_size for path in cache.rglob("*.arrow")}
    prepared, _ = prepare_dpo_dataset(source)
    written = sum(path.stat().st_size for path in cache.rglob("*.arrow") if path not in before)
    assert sum(before.values()) > image_bytes  # the source itself holds the images
    assert written < image_bytes / 20, (written, image_bytes)
    # The prepared rows still carry the images, winner first.
    assert prepared[1]["image_w"] == pairs[1]["jpg_0"] and prepared[0]["image_w"] == pairs[0]["jpg_1"]


def test_a_stream_is_checked_like_a_dataset():
    good = _pairs(4).to_dict()
    rows = {key: [*values, values[0]] for key, values in good.items()}
    rows["jpg_1"][4] = b"not an image"
    table = Dataset.from_dict(rows)
    prepared, dropped = prepare_dpo_dataset(table)
    streamed, stream_dropped = prepare_dpo_dataset(table.to_iterable_dataset())
    assert dropped == {"unreadable image": 1} and stream_dropped == {}  # a stream's counts are not known ahead
    assert list(streamed) == list(prepared)
    bad = Dataset.from_dict({**good, "label_0": [1.0, 2.0, 0.0, 1.0]}).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"Row 1 of the pair stream: invalid label \(2.0\)"):
        list(prepare_dpo_dataset(bad)[0])


def _halves(width: int, height: int, left: tuple, right: tuple) -> Image.Image:
    image = Image.new("RGB", (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def test_the_loser_is_resized_to_the_winners_size_before_the_shared_crop():
    winner = _halves(40, 24, (255, 0, 0), (0, 255, 0))
    loser = _halves(24, 40, (0, 0, 255), (255, 255, 0))  # another size and aspect ratio
    tokenizer = tiny_clip_tokenizer()
    collator = DiffusionDPOCollator(tokenizer, resolution=16, tokenizer_2=tokenizer)
    batch = collator([{"caption": "a pair", "image_w": _png(winner), "image_l": _png(loser)}])

    def by_hand(image):  # the diffusers SDXL recipe: loser → winner size, shorter side → 16, center crop
        image = image.resize((40, 24), Image.BICUBIC).resize((27, 16), Image.BICUBIC).crop((5, 0, 21, 16))
        return torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)

    torch.testing.assert_close(batch["pixel_values"][0, 0], by_hand(winner))
    torch.testing.assert_close(batch["pixel_values"][0, 1], by_hand(loser))
    # The time ids (winner's original size, crop top-left, target) describe both images.
    assert batch["add_time_ids"].tolist() == [[24.0, 40.0, 0.0, 5.0, 16.0, 16.0]]


def test_random_flips_mirror_both_images_of_a_pair():
    images = random_images(32, size=16, seed=2)
    rows = [{"caption": f"p{i}", "image_w": images[i], "image_l": images[16 + i]} for i in range(16)]
    tokenizer = tiny_clip_tokenizer()
    plain = DiffusionDPOCollator(tokenizer, resolution=16)(rows)["pixel_values"]
    flipped = DiffusionDPOCollator(tokenizer, resolution=16, random_flip=True, seed=3)(rows)["pixel_values"]
    mirrored = [torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain, strict=True)]
    kept = [torch.equal(f, p) for f, p in zip(flipped, plain, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))  # winner and loser flipped together
    assert 4 <= sum(mirrored) <= 12  # about half
    config = {f.name: f for f in fields(DiffusionDPOConfig)}
    assert config["random_flip"].default is True and "flip" in config["random_flip"].metadata["help"].lower()


def _masks(collator, dataset, num_workers: int) -> list[tuple[bool, ...]]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=num_workers, collate_fn=collator)
    empty = collator.tokenizer([""], padding="max_length", max_length=collator.tokenizer.model_max_length).input_ids
    return [tuple(row.tolist() == empty[0] for row in batch["input_ids"]) for batch in loader]


def test_collator_draws_depend_on_the_pair_and_epoch_not_on_workers():
    prepared, _ = prepare_dpo_dataset(_pairs(16))
    collator = DiffusionDPOCollator(tiny_clip_tokenizer(), resolution=32, proportion_empty_prompts=0.5, seed=7)
    in_process = _masks(collator, prepared, num_workers=0)
    with_workers = _masks(collator, prepared, num_workers=2)
    assert with_workers == in_process  # the same draws in any worker
    assert with_workers[0] != with_workers[1]  # each worker used to replay one generator's sequence
    collator.set_epoch(1)
    assert _masks(collator, prepared, num_workers=2) != in_process  # a new epoch, new draws
