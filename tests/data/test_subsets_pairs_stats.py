import numpy as np
import pandas as pd
import pytest

from imagegem_hf.data.build import build_dataset
from imagegem_hf.data.pairs import min_max_pairs, reaction_scores, topic_of, write_preference_pairs
from imagegem_hf.data.schema import features_for
from imagegem_hf.data.stats import dataset_statistics
from imagegem_hf.data.subsets import filter_min_interactions, leave_one_last_split, make_rec_subsets


def test_leave_one_last_tie_break_is_time_then_row_order():
    df = pd.DataFrame(
        {"userHash": ["u"] * 4 + ["v"] * 3, "itemId": [1, 2, 3, 4, 7, 8, 9], "timestamp": [5, 9, 9, 1, 0, 0, 0]}
    )
    train, val, test = leave_one_last_split(df)
    # u ordered by time: 4(t1), 1(t5), 2(t9), 3(t9; later row) → test 3, validation 2.
    assert test.set_index("userHash").itemId.to_dict() == {"u": 3, "v": 9}
    assert val.set_index("userHash").itemId.to_dict() == {"u": 2, "v": 8}
    assert train.groupby("userHash").itemId.apply(list).to_dict() == {"u": [4, 1], "v": [7]}


def test_leave_one_last_rejects_short_users_and_nulls():
    df = pd.DataFrame({"userHash": ["u", "u", "v", "v", "v"], "itemId": [1, 2, 1, 2, 3], "timestamp": range(5)})
    with pytest.raises(ValueError, match="1 user"):
        leave_one_last_split(df)
    assert filter_min_interactions(df).userHash.unique().tolist() == ["v"]
    with pytest.raises(ValueError, match="Null"):
        leave_one_last_split(df.assign(itemId=[1, None, 1, 2, 3]))


def test_model_subset_keeps_last_timestamp_per_user_model():
    df = pd.DataFrame(
        {
            "userHash": ["u"] * 5,
            "itemType": ["model"] * 5,
            "itemId": [1, 2, 1, 3, 1],
            "timestamp": [1, 2, 3, 4, 5],
            "source": ["generated"] * 5,
            "weight": [1.0] * 5,
        }
    )
    models = make_rec_subsets(df)["models"]
    assert models[["itemId", "timestamp"]].values.tolist() == [[2, 2], [3, 4], [1, 5]]


def test_min_max_pairs_on_a_hand_made_cluster():
    df = pd.DataFrame(
        {
            "imageId": [1, 2, 3, 4, 5, 6],
            "prompt": ["a red car"] * 5 + ["x"],
            "s": [0.5, 0.9, 0.1, 0.7, 0.3, 5.0],
            "cluster_id": [0, 0, 0, 0, 0, -1],
        }
    )
    pairs = min_max_pairs(df, "s", pairs_per_cluster=2)
    assert pairs[["chosen", "rejected"]].values.tolist() == [[2, 3], [4, 5]]
    assert pairs.topic.tolist() == ["cars", "cars"]
    assert min_max_pairs(df, "s", pairs_per_cluster=2, min_margin=0.5)[["chosen"]].values.tolist() == [[2]]


def test_reaction_scores_and_topics():
    df = pd.DataFrame({"userHash": ["a", "a", "a"], "likeCount": [0, 2, 10], "heartCount": [0, 0, 2]})
    np.testing.assert_allclose(reaction_scores(df), [0 / 3, 2 / 3, 12 / 3], rtol=1e-6)
    assert topic_of("a corgi puppy in the grass") == "dogs"
    assert topic_of("a girl walking her dog") == ""
    assert topic_of("misty forest at sunset") == "scenery"


def test_pairs_written_into_a_built_dataset_and_stats(raw_dir, tmp_path):
    from datasets import load_dataset

    out = tmp_path / "ds"
    build_dataset(raw_dir, out, show_progress=False)
    pairs = min_max_pairs(
        pd.DataFrame({"imageId": [1, 2], "prompt": ["p", "p"], "s": [1.0, 0.0], "cluster_id": [0, 0]}), "s"
    )
    write_preference_pairs(pairs, out)
    ds = load_dataset(str(out), "preference_pairs", split="train", cache_dir=str(tmp_path / "cache"))
    assert ds[0]["chosen"] == 1 and ds[0]["rejected"] == 2
    written = dataset_statistics(out, tmp_path / "stats")
    assert all(p.exists() for p in written.values())
    assert "| images | 12 | 12 |" in written["statistics"].read_text()
    with pytest.raises(FileNotFoundError, match="not a built dataset"):
        write_preference_pairs(pairs, tmp_path)


def test_every_config_listed_in_the_card_loads_fresh_and_after_pairs(raw_dir, tmp_path):
    from datasets import load_dataset
    from huggingface_hub.repocard import metadata_load

    out = tmp_path / "ds"
    build_dataset(raw_dir, out, show_progress=False)

    def listed_configs_load():
        names = [c["config_name"] for c in metadata_load(out / "README.md")["configs"]]
        for name in names:
            ds = load_dataset(str(out), name, split="train", cache_dir=str(tmp_path / f"cache{len(names)}"))
            assert ds.features == features_for(name) and len(ds) > 0
        return names

    assert listed_configs_load() == ["images", "loras", "interactions"]  # no pairs yet: nothing to load
    pairs = min_max_pairs(
        pd.DataFrame({"imageId": [1, 2], "prompt": ["p", "p"], "s": [1.0, 0.0], "cluster_id": [0, 0]}), "s"
    )
    write_preference_pairs(pairs, out)
    assert listed_configs_load() == ["images", "loras", "interactions", "preference_pairs"]
    write_preference_pairs(pairs.iloc[:0], out)  # emptied again: unlisted again
    assert [c["config_name"] for c in metadata_load(out / "README.md")["configs"]][-1] == "interactions"
    assert "# ImageGem-format dataset" in (out / "README.md").read_text()  # the card's body is kept
