import pandas as pd
import pytest
from datasets import load_dataset

from imagegem_hf.preference.data import (
    PUBLISHED_COLUMNS,
    PreferenceCollator,
    PreferenceExample,
    build_user_splits,
    group_pickapic_records,
    load_images_table,
    read_processed,
    save_preference_dataset,
    synthetic_pickapic_records,
)
from imagegem_hf.preference.sequence import PreferenceSequenceBuilder
from imagegem_hf.testing import tiny_vlm


def record(user, a, b, label, caption="c"):
    return {"user_id": user, "image_0": a, "image_1": b, "label_0": label, "caption": caption}


def test_grouping_drops_ties_and_orients_pairs():
    users = group_pickapic_records(
        [record(1, "a", "b", 1), record(1, "c", "d", 0), record(1, "e", "f", 0.5), record(2, "g", "h", 1.0)]
    )
    assert users["1"].pairs == [("a", "b", "c"), ("d", "c", "c")]
    assert users["2"].pairs == [("g", "h", "c")]
    with pytest.raises(ValueError, match="label_0"):
        group_pickapic_records([record(1, "a", "b", 0.3)])


def test_user_filter_and_disjoint_splits():
    # users 0..5 have 12 unique liked images, user 6 has 12 pairs but only 3 unique liked images
    records = [record(u, f"u{u}-{i}", f"u{u}-{i}x", 1) for u in range(6) for i in range(12)]
    records += [record(6, f"u6-{i % 3}", f"u6-{i}x", 1) for i in range(12)]
    splits = build_user_splits(
        group_pickapic_records(records), n_ref=4, val_users=1, test_users=2, seen_users=2, seen_pairs_per_user=2
    )
    users = {name: {e.user_id for e in examples} for name, examples in splits.items()}
    assert "6" not in set().union(*users.values())
    assert len(users["test_unseen"]) == 2 and len(users["validation"]) == 1 and len(users["train"]) == 3
    assert users["test_unseen"].isdisjoint(users["train"] | users["validation"])
    assert users["test_seen"] <= users["train"] and len(users["test_seen"]) == 2
    assert len(splits["test_seen"]) == 4 and len(splits["train"]) == 3 * 12 - 4  # no image is shared between pairs
    train_targets = {(e.user_id, e.liked) for e in splits["train"]}
    for e in splits["test_seen"]:
        assert (e.user_id, e.liked) not in train_targets  # held out
        assert e.liked not in {r[0] for r in e.references}
        assert all(ref_user.startswith(f"u{e.user_id}-") for ref_user, _, _ in e.references)
    for e in splits["train"]:
        assert len(e.references) == 4 and (e.liked, e.disliked, e.prompt) not in e.references
        assert {e.image0, e.image1} == {e.liked, e.disliked}
    with pytest.raises(ValueError, match="unique liked"):
        build_user_splits(group_pickapic_records(records), val_users=4, test_users=4)


def test_published_format_round_trip_and_hub_folder(tmp_path):
    records, images = synthetic_pickapic_records(n_users=10, pairs_per_user=13, seed=1)
    splits = build_user_splits(group_pickapic_records(records), val_users=2, test_users=2, seen_users=2)
    folder = save_preference_dataset(splits, tmp_path / "ds", images)
    frame = pd.read_parquet(folder / "pairs" / "test_unseen-00000-of-00001.parquet")
    assert tuple(frame.columns) == PUBLISHED_COLUMNS
    assert read_processed(folder, split="test_unseen") == splits["test_unseen"]
    assert read_processed(frame) == splits["test_unseen"]
    loaded = load_dataset(str(folder), "pairs", split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == len(splits["train"])
    table = load_images_table(folder)
    assert set(table) == set(images) and table["u0-p0-a"].tobytes() == images["u0-p0-a"].tobytes()
    assert "config_name: pairs" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="0 or 1"):
        PreferenceExample.from_row({**frame.iloc[0].to_dict(), "label0": 0.5})


def test_collator_scores_both_targets_with_the_same_references():
    records, images = synthetic_pickapic_records(n_users=6, pairs_per_user=12, seed=2)
    splits = build_user_splits(group_pickapic_records(records), val_users=1, test_users=1, seen_users=0)
    _, processor = tiny_vlm()
    builder = PreferenceSequenceBuilder(processor)
    collator = PreferenceCollator(builder, images.__getitem__, n_ref=3, seed=0, share_prefix=False)
    batch = collator(splits["train"][:2])
    assert batch["labels"].tolist() == [1, 1, 0, 0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for i in range(2):  # same references in the same order: the rows differ only in the target image pixels
        assert torch_equal_rows(ids[i], mask[i], ids[i + 2], mask[i + 2])
    # the reference order is keyed by (seed, epoch, example): the same in another batch, anew in the next epoch;
    # without shuffling it is the default order
    alone = collator(splits["train"][1:2])
    assert torch_equal_rows(alone["input_ids"][0], alone["attention_mask"][0], ids[1], mask[1])
    collator.set_epoch(1)
    again = collator(splits["train"][:2])["input_ids"]
    assert again.shape != ids.shape or not bool((again == ids).all())
    fixed = PreferenceCollator(builder, images.__getitem__, n_ref=3, shuffle_references=False, share_prefix=False)
    e = splits["train"][0]
    default = builder([e.query(images.__getitem__, e.liked, 3)])["input_ids"][0]
    row = fixed(splits["train"][:1])["input_ids"][0]
    assert row[-len(default) :].tolist() == default.tolist()


def torch_equal_rows(a, mask_a, b, mask_b):
    return a[mask_a.bool()].tolist() == b[mask_b.bool()].tolist()


def test_shared_prefix_batch_splits_each_sequence_at_the_target_turn():
    records, images = synthetic_pickapic_records(n_users=6, pairs_per_user=12, seed=2)
    splits = build_user_splits(group_pickapic_records(records), val_users=1, test_users=1, seen_users=0)
    _, processor = tiny_vlm()
    builder = PreferenceSequenceBuilder(processor)
    examples = splits["train"][:3]
    shared = PreferenceCollator(builder, images.__getitem__, n_ref=3, seed=5)(examples)
    full = PreferenceCollator(builder, images.__getitem__, n_ref=3, seed=5, share_prefix=False)(examples)
    assert shared["labels"].tolist() == full["labels"].tolist() == [1, 1, 1, 0, 0, 0]
    assert shared["prefix_input_ids"].shape[0] == 3 and shared["target_input_ids"].shape[0] == 6
    for i in range(3):
        prefix = shared["prefix_input_ids"][i][shared["prefix_attention_mask"][i].bool()].tolist()
        for row, target in ((i, 2 * i), (i + 3, 2 * i + 1)):  # liked, then disliked target of example i
            suffix = shared["target_input_ids"][target][shared["target_attention_mask"][target].bool()].tolist()
            assert prefix + suffix == full["input_ids"][row][full["attention_mask"][row].bool()].tolist()
