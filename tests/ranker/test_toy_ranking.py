"""The toy recommendation world, the other-user control and the stand-in scorer's stability (fast)."""

import numpy as np
import pytest

from imagegem_hf.ranker import RankerConfig, RankItem, VLMRankerPipeline, trial_subsets
from imagegem_hf.ranker.toy_ranking import (
    PositionBiasedScorer,
    ToyRankingWorldConfig,
    other_users_histories,
    rank_stability,
    toy_ranking_world,
)


def test_world_picks_follow_taste_and_community():
    world = toy_ranking_world(ToyRankingWorldConfig(n_items=200, n_users=60, interactions_per_user=10))
    picks = world.interactions
    assert len(picks) == 600 and not picks.duplicated(["user", "item"]).any()
    users = picks["user"].str[1:].astype(int).to_numpy()
    items = picks["item"].to_numpy()
    same_community = (world.item_communities[items] == world.user_communities[users]).mean()
    agreement = np.einsum("ij,ij->i", world.tastes[users], world.attributes[items]).mean()
    assert same_community > 1.5 / world.config.n_communities  # chance: 1 / n_communities
    assert agreement > 0.2  # chance: 0 (attributes are ±1 and independent of the tastes)


def test_the_test_item_is_a_typical_pick_when_picks_come_in_a_random_order():
    def utility_by_time(random_pick_order):
        config = ToyRankingWorldConfig(
            n_items=200, n_users=200, interactions_per_user=12, random_pick_order=random_pick_order
        )
        world = toy_ranking_world(config)
        picks = world.interactions.sort_values(["user", "timestamp"])
        users = picks["user"].str[1:].astype(int).to_numpy()
        visual = np.einsum("ij,ij->i", world.tastes[users], world.attributes[picks["item"].to_numpy()])
        return visual.reshape(config.n_users, config.interactions_per_user).mean(0)  # per place in time

    ordered, shuffled = utility_by_time(False), utility_by_time(True)
    # in the sequential draw's order the test item (the last pick) is the least wanted; in a random order, typical
    assert ordered[-1] < ordered.mean() - 0.05 and ordered[0] > ordered.mean() + 0.05
    assert abs(shuffled[-1] - shuffled.mean()) < 0.05


def test_other_users_histories_gives_no_user_their_own():
    payload = {"histories": {f"u{i}": [i, i + 100] for i in range(7)}, "rankings": {}, "targets": {}}
    control = other_users_histories(payload, seed=0)
    assert sorted(map(tuple, control["histories"].values())) == sorted(map(tuple, payload["histories"].values()))
    assert all(control["histories"][u] != h for u, h in payload["histories"].items())


def _requests(n_users=12, m=10, seed=0):
    rng = np.random.default_rng(seed)
    relevance = {}
    requests = []
    for u in range(n_users):
        values = rng.permutation(np.linspace(20, 80, m))
        relevance |= {(f"user{u}", f"c{j}"): float(v) for j, v in enumerate(values)}
        requests.append((f"user{u}", [RankItem(f"c{j}", text="x") for j in range(m)]))
    return requests, lambda profile, item_id: relevance[(profile, item_id)]


def test_position_biased_scorer_applies_its_bias_in_the_order_shown():
    requests, relevance = _requests(n_users=1)
    pipeline = VLMRankerPipeline(
        backend=PositionBiasedScorer(relevance, position_bias=3.0, noise_std=5.0),
        config=RankerConfig(k_subset=10, n_trials=1),
    )
    profile, items = requests[0]
    result = pipeline.rank(profile, items, seed=0)  # greedy: no noise, every score is relevance − 3 · position
    assert all(s.n_trials == 1 for s in result.scores)
    positions = {s.item_id: (relevance(profile, s.item_id) - s.mean) / 3.0 for s in result.scores}
    np.testing.assert_allclose(sorted(positions.values()), range(10), atol=0.01)  # scores have 2 decimals


def test_randomized_scoring_stabilises_a_position_biased_noisy_scorer():
    requests, relevance = _requests()
    scorer = PositionBiasedScorer(relevance, position_bias=3.0, noise_std=6.0)
    stable = {}
    for name, overrides in {
        "randomized": dict(k_subset=5, n_trials=4),
        "single": dict(k_subset=10, n_trials=1),
    }.items():
        pipeline = VLMRankerPipeline(backend=scorer, config=RankerConfig(temperature=1.0, **overrides))
        stable[name] = rank_stability(pipeline, requests, seeds=list(range(5)))
    assert stable["randomized"]["unscored_fraction"] == stable["single"]["unscored_fraction"] == 0
    assert stable["randomized"]["rank_std"] <= 0.5 * stable["single"]["rank_std"], stable
    assert stable["randomized"]["kendall_tau"] > stable["single"]["kendall_tau"], stable
    greedy = VLMRankerPipeline(backend=PositionBiasedScorer(relevance, 0.0, 6.0), config=RankerConfig())
    steady = rank_stability(greedy, requests, seeds=[0, 1, 2])
    assert [steady[k] for k in ("rank_std", "kendall_tau", "unscored_fraction")] == pytest.approx([0.0, 1.0, 0.0])
    assert steady["bias_by_place"] == steady["spread_by_place"] == pytest.approx([0.0] * 5, abs=0.01)


def test_rank_stability_reports_the_score_error_by_place_shown():
    requests, relevance = _requests(n_users=6)
    bias = 2.0
    pipeline = VLMRankerPipeline(
        backend=PositionBiasedScorer(relevance, position_bias=bias, noise_std=0.0),
        config=RankerConfig(k_subset=10, n_trials=1, temperature=1.0),
    )
    seeds = [0, 1, 2, 3]
    measured = rank_stability(pipeline, requests, seeds)
    # by hand: the order each seed shows each user's candidates in (one generator per seed, users in turn)
    scorings = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for profile, items in requests:
            (order,) = trial_subsets(10, 10, 1, rng)
            for place, i in enumerate(order):
                score = relevance(profile, items[i].item_id) - bias * place
                scorings.setdefault((profile, i), []).append((place, score))
    deviations = {place: [] for place in range(10)}
    for pairs in scorings.values():
        median = np.median([score for _, score in pairs])
        for place, score in pairs:
            deviations[place].append(score - median)
    expected_bias = [np.mean(deviations[p]) for p in range(10)]
    assert measured["bias_by_place"] == pytest.approx(expected_bias, abs=0.01)  # scores have 2 decimals
    assert measured["spread_by_place"] == pytest.approx([np.mean(np.abs(deviations[p])) for p in range(10)], abs=0.01)
    assert measured["bias_by_place"][0] > 0 > measured["bias_by_place"][-1]
