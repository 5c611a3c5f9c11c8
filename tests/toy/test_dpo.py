from collections import Counter

import pytest

from imagegem_hf.toy.dpo import (
    ToyDPOConfig,
    dpo_prompt_split,
    evaluate_toy_dpo,
    flip_labels,
    mine_pairs,
    mine_toy_pairs,
    reward_gain,
    train_toy_dpo,
)
from imagegem_hf.toy.world import COLOURS, all_prompts, parse_prompt


def test_prompt_split_holds_out_and_validates_on_disjoint_full_prompts():
    train, validation, heldout = dpo_prompt_split()
    assert (len(train), len(validation), len(heldout)) == (60, 6, 18)
    assert not set(train) & set(heldout) and not set(train) & set(validation) and not set(validation) & set(heldout)
    assert set(train) | set(validation) | set(heldout) == set(all_prompts())
    # every colour and every shape is held out, on both backgrounds; each (colour, shape) once
    named = [parse_prompt(p) for p in heldout]
    assert len({(n["colour"], n["shape"]) for n in named}) == 18
    assert Counter(n["background"] for n in named) == {"dark": 9, "light": 9}
    assert {n["colour"] for n in map(parse_prompt, validation)} == set(COLOURS)


def test_flipped_labels_are_independent_of_the_winners_side(tmp_path):
    # exchange_format draws each winner's side with a seeded coin; the control's coins, drawn with the same seed,
    # must not be the same bits (that control would train on the true labels).
    import numpy as np
    import pandas as pd
    from PIL import Image

    from imagegem_hf.data.pairs import exchange_format, image_dir_loader

    n = 400
    for image_id in range(2 * n):
        Image.new("RGB", (4, 4), (image_id % 256, image_id // 256, 0)).save(tmp_path / f"{image_id}.png")
    pairs = pd.DataFrame({"prompt": ["a shape"] * n, "chosen": np.arange(n), "rejected": np.arange(n, 2 * n)})
    dataset = exchange_format(pairs, image_dir_loader(tmp_path), seed=0)
    flipped = flip_labels(dataset, seed=0)
    # exchange_format's label_0 is the true preference; the control keeps it for about half the pairs only
    kept = np.mean(np.array(flipped["label_0"]) == np.array(dataset["label_0"]))
    assert 0.42 < kept < 0.58
    # the pairs, captions and images are untouched
    assert flipped["jpg_0"] == dataset["jpg_0"] and flipped["caption"] == dataset["caption"]


def test_default_mining_pairs_images_of_the_same_prompt(tmp_path):
    # With clusters that merge prompts, min-max pairs set the best image of one prompt against the worst of another
    # (93% of the pairs at 4 seeds per prompt with min_cluster_size=5), under the winner's caption.
    import numpy as np
    import pandas as pd

    from imagegem_hf.toy import parse_prompt, random_spec, render

    config = ToyDPOConfig(train_seeds=4)
    train, _, _ = dpo_prompt_split()
    rng = np.random.default_rng(0)
    rows = []
    for prompt in train:
        for seed in range(config.train_seeds):
            render(random_spec(rng, **parse_prompt(prompt))).save(tmp_path / f"{len(rows)}.png")
            rows.append({"imageId": len(rows), "prompt": prompt, "seed": seed})
    images = pd.DataFrame(rows)
    pairs = mine_pairs(
        images, tmp_path, pairs_per_cluster=config.pairs_per_cluster, min_cluster_size=config.min_cluster_size
    )
    prompt_of = images.set_index("imageId")["prompt"]
    assert len(pairs) == len(train) * config.train_seeds // 2
    assert (prompt_of.loc[pairs["rejected"]].to_numpy() == prompt_of.loc[pairs["chosen"]].to_numpy()).all()
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()


def test_reward_gain_pairs_the_same_prompt_and_seed():
    import pandas as pd

    scores = pd.DataFrame(
        {
            "model": ["b"] * 4 + ["t"] * 4,
            "prompt": ["p", "p", "q", "q"] * 2,
            "seed": [0, 1, 0, 1] * 2,
            "reward": [1.0, 2.0, 3.0, 4.0, 2.0, 2.0, 3.5, 5.0],
        }
    )
    # the tuned rows in another order must not change the answer
    scores = pd.concat([scores.iloc[:4], scores.iloc[4:].iloc[::-1]])
    gain = reward_gain(scores, "b", "t")
    assert gain["win_rate"] == 0.875  # +1, 0 (a tie counts one half), +0.5, +1
    assert gain["ties"] == 0.25
    assert gain["mean_gain"] == pytest.approx(2.5 / 4)
    # per-seed means: seed 0 (1 + 0.5) / 2 = 0.75, seed 1 (0 + 1) / 2 = 0.5; sample std
    assert gain["seed_std"] == pytest.approx(pd.Series([0.75, 0.5]).std())


# The benchmark's checks (benchmarks/learn_dpo.py) at a smaller size: half the training samples, 108 held-out images.
SMALL = ToyDPOConfig(train_seeds=4, eval_seeds=6)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_dpo")
    _, dataset = mine_toy_pairs(folder, SMALL)
    train_toy_dpo(dataset, folder / "dpo", SMALL)
    train_toy_dpo(flip_labels(dataset), folder / "control", SMALL)
    _, stats = evaluate_toy_dpo({"dpo": folder / "dpo", "control": folder / "control"}, SMALL)
    return stats


@pytest.mark.slow
def test_dpo_wins_and_the_flipped_label_control_does_not(small_run):
    assert small_run["dpo"]["n"] == 108
    assert small_run["dpo"]["win_rate"] >= 0.65
    assert small_run["control"]["win_rate"] <= 0.55


@pytest.mark.slow
def test_dpo_mean_gain_exceeds_three_seed_stds(small_run):
    assert small_run["dpo"]["mean_gain"] > 3 * small_run["dpo"]["seed_std"]


@pytest.mark.parametrize(("split", "n_prompts", "first_seed"), [("held-out", 18, 1000), ("validation", 6, 2000)])
def test_both_splits_are_evaluated_on_as_many_images(monkeypatch, split, n_prompts, first_seed):
    import imagegem_hf.dpo.evaluate
    import imagegem_hf.toy.dpo

    asked = {}

    class Stop(Exception):
        pass

    def record(pipelines, prompts, scorers, seeds, **kwargs):
        asked.update(prompts=list(prompts), seeds=list(seeds))
        raise Stop

    monkeypatch.setattr(imagegem_hf.toy.dpo, "load_toy_pipeline", lambda path=None: None)
    monkeypatch.setattr(imagegem_hf.dpo.evaluate, "evaluate_pipelines", record)
    with pytest.raises(Stop):
        evaluate_toy_dpo({}, ToyDPOConfig(eval_seeds=4), split=split)
    assert len(asked["prompts"]) == n_prompts
    assert asked["seeds"] == list(range(first_seed, first_seed + 4 * 18 // n_prompts))
