"""Bad input gets an error naming the user and the image, or a counted quarantine, never a bare exception or a
silent guess."""

import io
import warnings

import pandas as pd
import pytest

from imagegem_hf.preference.data import (
    PreferenceCollator,
    PreferenceExample,
    build_user_splits,
    group_pickapic_records,
    read_records,
    synthetic_pickapic_records,
)
from imagegem_hf.preference.sequence import PreferenceSequenceBuilder
from imagegem_hf.testing import tiny_vlm


@pytest.fixture(scope="module")
def builder():
    return PreferenceSequenceBuilder(tiny_vlm()[1])


def users_and_images(n_users=6):
    records, images = synthetic_pickapic_records(n_users=n_users, pairs_per_user=12, tie_fraction=0.0, seed=4)
    return records, images


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def records_file(path, records, images, broken=None):
    frame = pd.DataFrame(records)
    data = {key: png(image) for key, image in images.items()} | (broken or {})
    frame["jpg_0"], frame["jpg_1"] = frame["image_0"].map(data), frame["image_1"].map(data)
    frame.to_parquet(path)
    return path


def test_fewer_references_than_n_ref_are_used_and_counted(builder):
    records, images = users_and_images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = build_user_splits(
            group_pickapic_records(records), n_ref=10, val_users=1, test_users=1, seen_users=2, seed=0
        )
    # every image is in one pair: other users have 11 references available, a seen user's training targets have
    # 12 - 2 held out - 1 = 9, so exactly the 2 * 10 training examples of the seen users are short
    seen = {e.user_id for e in splits["test_seen"]}
    short = [e for e in splits["train"] if e.user_id in seen]
    assert len(short) == 20 and all(len(e.references) == 9 for e in short)
    assert all(len(e.references) == 10 for name in splits for e in splits[name] if e not in short)
    assert any("20 examples with fewer than n_ref references" in str(w.message) for w in caught)
    collator = PreferenceCollator(builder, images.__getitem__, n_ref=10, share_prefix=False)
    with pytest.warns(UserWarning, match="fewer than n_ref=10"):
        collator(short[:2])
    collator(short[2:3] + splits["test_unseen"][:1])
    assert collator.short_reference_examples == 3


def test_missing_image_key_names_the_user_and_the_image(builder, tmp_path):
    records, images = users_and_images()
    splits = build_user_splits(group_pickapic_records(records), n_ref=2, val_users=1, test_users=1, seen_users=1)
    example = splits["train"][0]
    without = {k: v for k, v in images.items() if k != example.liked}
    with pytest.raises(KeyError) as error:
        PreferenceCollator(builder, without.__getitem__, n_ref=2)([example])
    assert f"User {example.user_id}" in str(error.value) and repr(example.liked) in str(error.value)
    # a records file whose bytes for one image are missing: that image's pairs are quarantined, with a count
    from imagegem_hf.preference.data import build_preference_dataset

    missing = records[0]["image_0"]
    path = records_file(tmp_path / "records.parquet", records, images, broken={missing: None})
    with pytest.warns(UserWarning, match="1 images without usable bytes"):
        summary = build_preference_dataset(
            path, tmp_path / "ds", ("jpg_0", "jpg_1"), n_ref=2, val_users=1, test_users=1
        )
    assert summary.issues.counts["pairs showing a quarantined image (dropped)"] == 1
    # saving examples whose image is not in the images given is refused, naming the user and the image
    from imagegem_hf.preference.data import save_preference_dataset

    with pytest.raises(KeyError, match=f"{example.liked!r} \\(user {example.user_id}\\)"):
        save_preference_dataset({"train": [example]}, tmp_path / "out", without)


def test_corrupt_or_truncated_image_bytes_name_the_key_and_are_quarantined(builder, tmp_path):
    records, images = users_and_images()
    truncated, garbage = records[3]["image_1"], records[20]["image_0"]
    broken = {truncated: png(images[truncated])[:60], garbage: b"not an image"}
    path = records_file(tmp_path / "records.parquet", records, images, broken=broken)
    _, table = read_records(path, ("jpg_0", "jpg_1"))  # nothing is decoded yet, so the table loads
    assert table[records[0]["image_0"]].tobytes() == images[records[0]["image_0"]].tobytes()
    with pytest.raises(ValueError, match=f"{truncated!r} \\(records.parquet, row 3\\) cannot be decoded"):
        table[truncated]
    example = PreferenceExample(
        "user1", [(garbage, truncated, "")], records[0]["image_0"], records[0]["image_1"], "", 1
    )
    with pytest.raises(ValueError, match=f"User user1: image {garbage!r} cannot be loaded"):
        PreferenceCollator(builder, table.__getitem__, n_ref=1)([example])
    from imagegem_hf.preference.data import build_preference_dataset, load_preference_dataset

    with pytest.warns(UserWarning, match="2 images without usable bytes"):
        summary = build_preference_dataset(
            path, tmp_path / "ds", ("jpg_0", "jpg_1"), n_ref=2, val_users=1, test_users=1
        )
    assert summary.issues.counts["pairs showing a quarantined image (dropped)"] == 2
    splits, stored = load_preference_dataset(tmp_path / "ds")
    used = {
        k for s in splits.values() for e in s for k in (e.image0, e.image1, *(x for r in e.references for x in r[:2]))
    }
    assert used and not used & set(broken) and not set(broken) & set(stored)
    assert "2 images without usable bytes (quarantined)" in (tmp_path / "ds" / "README.md").read_text()


def test_none_and_nan_prompts_mean_no_prompt(tmp_path):
    records = [
        {"user_id": 1, "image_0": "a", "image_1": "b", "label_0": 1, "caption": None},
        {"user_id": 1, "image_0": "c", "image_1": "d", "label_0": 0, "caption": float("nan")},
        {"user_id": 1, "image_0": "e", "image_1": "f", "label_0": 1, "caption": pd.NA},
    ]
    assert [p[2] for p in group_pickapic_records(records)["1"].pairs] == ["", "", ""]
    row = {
        "user_id": "1",
        "reference_list": ["a", "c"],
        "reference_list_bad": ["b", "d"],
        "reference_prompt_list": [None, float("nan")],
        "image0": "e",
        "image1": "f",
        "prompt": None,
        "label0": 1,
    }
    example = PreferenceExample.from_row(row)
    assert example.prompt == "" and [r[2] for r in example.references] == ["", ""]
    assert PreferenceExample.from_row({**row, "prompt": float("nan")}).prompt == ""


@pytest.mark.parametrize("label", [None, "yes", 2, -1, 0.3, float("nan")])
def test_labels_outside_0_and_1_are_refused_naming_the_user(label, tmp_path):
    bad = {"user_id": "u7", "image_0": "a7", "image_1": "b7", "label_0": label, "caption": "c"}
    with pytest.raises(ValueError, match=r"User 'u7', pair \('a7', 'b7'\): label_0 must be 0"):
        group_pickapic_records([{**bad, "label_0": 1}, bad])
    row = {"user_id": "u7", "reference_list": [], "reference_list_bad": [], "reference_prompt_list": []}
    with pytest.raises(ValueError, match=r"User u7, pair \('a7', 'b7'\): label0 must be 0 or 1"):
        PreferenceExample.from_row({**row, "image0": "a7", "image1": "b7", "prompt": "", "label0": label})
    if label is None or isinstance(label, float | int):  # a parquet column holds numbers (None: null)
        from imagegem_hf.preference.data import build_preference_dataset

        records, _ = users_and_images()
        pd.DataFrame(records + [bad]).to_parquet(tmp_path / "records.parquet")
        with pytest.raises(ValueError, match=r"User 'u7', pair \('a7', 'b7'\)"):
            build_preference_dataset(tmp_path / "records.parquet", tmp_path / "ds", val_users=1, test_users=1)
