"""Splits and references are drawn by image: where one image appears in several pairs (as in Pick-a-Pic, whose
users rate several pairs out of the same batch of generated images), no test target may leak into references or
training targets."""

import warnings

import numpy as np

from imagegem_hf.preference.data import build_user_splits, group_pickapic_records


def session_records(n_users=12, sessions=8, seed=0):
    """Pick-a-Pic-like records: per session one prompt and 4 images, rated in 3 pairs (image 0 vs 1, then the
    winner vs image 2, then that winner vs image 3), so most images appear in 2 or 3 pairs."""
    rng = np.random.default_rng(seed)
    records = []
    for u in range(n_users):
        for s in range(sessions):
            keys = [f"u{u}-s{s}-i{k}" for k in range(4)]
            winner = keys[0]
            for challenger in keys[1:]:
                label = int(rng.integers(2))
                records.append(
                    {"user_id": f"user{u}", "image_0": winner, "image_1": challenger, "label_0": label, "caption": s}
                )
                winner = winner if label == 1 else challenger
    return records


def leaks(splits):
    """Every way a test image reaches what the model sees for the same user, counted independently of the builder."""
    refs = lambda e: {k for r in e.references for k in r[:2]}  # noqa: E731
    targets = lambda e: {e.image0, e.image1}  # noqa: E731
    found = {name: sum(bool(targets(e) & refs(e)) for e in examples) for name, examples in splits.items()}
    seen_train = {}
    for e in splits["train"]:
        seen_train.setdefault(e.user_id, set()).update(targets(e) | refs(e))
    found["test_seen in the user's training targets or references"] = sum(
        bool(targets(e) & seen_train.get(e.user_id, set())) for e in splits["test_seen"]
    )
    return found


def test_test_targets_never_leak_into_references_or_training():
    records = session_records()
    users = group_pickapic_records(records)
    shared = sum(
        len([p for p in u.pairs if key in p[:2]]) > 1
        for u in users.values()
        for key in {k for p in u.pairs for k in p[:2]}
    )
    assert shared > 100  # the data does reuse images across pairs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = build_user_splits(
            users, min_liked=5, n_ref=4, val_users=2, test_users=3, seen_users=4, seen_pairs_per_user=2, seed=0
        )
    assert leaks(splits) == {
        "train": 0,
        "validation": 0,
        "test_seen": 0,
        "test_unseen": 0,
        "test_seen in the user's training targets or references": 0,
    }
    assert len(splits["test_unseen"]) == 3 * 8 * 3 and len(splits["validation"]) == 2 * 8 * 3
    assert len(splits["test_seen"]) == 4 * 2 and len(splits["train"]) > 100
    assert all(len(e.references) == 4 for examples in splits.values() for e in examples)
    # held-out images remove the user's other pairs that show them from training, and the builder says how many
    assert any("sharing an image with a held-out pair" in str(w.message) for w in caught)
