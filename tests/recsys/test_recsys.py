import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from imagegem_hf.cli import main
from imagegem_hf.recsys import MODELS, InteractionData, Item2Vec, ItemKNN, Pop, Recommender, SASRec, TwoTower, UserKNN
from imagegem_hf.recsys.evaluate import evaluate_models
from imagegem_hf.recsys.index import RetrievalIndex
from imagegem_hf.recsys.metrics import metrics_from_ranks, target_ranks
from imagegem_hf.recsys.training import StepSchedule, run_schedule


def test_ranks_are_pessimistic_on_ties_and_respect_masking():
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    assert target_ranks(scores, np.array([1, 2])).tolist() == [3, 4]  # ties never favour the target
    exclude = sp.csr_matrix(np.array([[1, 0, 1, 0], [1, 1, 1, 0]]))
    # Row 2: items 0, 1 masked, the target (2) never is; item 3 still ties with it and ranks above.
    assert target_ranks(scores, np.array([1, 2]), exclude).tolist() == [1, 2]
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.array([[np.nan, 1.0]]), np.array([0]))


def test_metrics_against_hand_computation():
    m = metrics_from_ranks(np.array([1, 2, 5, 20]), ks=(3, 10))
    assert m["recall@3"] == 0.5 and m["recall@10"] == 0.75 and m["hit@3"] == 0.5
    assert m["ndcg@3"] == pytest.approx((1 + 1 / np.log2(3)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6)) / 4)
    assert m["mrr"] == pytest.approx((1 + 0.5 + 0.2 + 0.05) / 4)
    assert m["avg_rank"] == 7.0 and m["rank_std"] == pytest.approx(np.std([1, 2, 5, 20]))


def _cycle_table(n_users=60, n_items=8, length=8):
    rows = []
    for u in range(n_users):
        start = u % n_items
        rows += [(f"u{u}", f"item{(start + t) % n_items}", t) for t in range(length)]
    return pd.DataFrame(rows, columns=["userHash", "itemId", "timestamp"])


def test_interaction_data_dedupes_and_validates(tmp_path):
    df = pd.DataFrame({"userHash": ["a", "a", "a", "b"], "itemId": [1, 1, 2, 1], "timestamp": [3, 1, 2, 0]})
    data = InteractionData.from_table(df)
    assert len(data) == 3 and data.item_ids.tolist() == [1, 2]
    assert data.sequences()[0].tolist() == [1, 0]  # a: item 2 (t=2) then item 1 (kept at its last time, t=3)
    assert len(InteractionData.from_table(df, duplicates="keep_all")) == 4
    df.to_csv(tmp_path / "t.csv", index=False)
    assert len(InteractionData.from_table(tmp_path / "t.csv")) == 3
    with pytest.raises(ValueError, match="empty"):
        InteractionData.from_table(df.iloc[:0])
    with pytest.raises(ValueError, match="null"):
        InteractionData.from_table(df.assign(itemId=[1, None, 2, 1]))
    with pytest.raises(ValueError, match="mixes strings and numbers"):
        InteractionData.from_table(df.assign(itemId=pd.Series([1, "x", 2, 1], dtype=object)))
    iso = df.assign(timestamp=["2024-01-03", "2024-01-01", "2024-01-02", "2024-01-01"])
    assert InteractionData.from_table(iso).sequences()[0].tolist() == [1, 0]
    with pytest.raises(ValueError, match="Missing column"):
        InteractionData.from_table(df, time_col="when")


def test_itemknn_recovers_cooccurrence_neighbours():
    rows = [(u, i, t) for u in range(20) for t, i in enumerate([0, 1] if u < 10 else [2, 3])]
    data = InteractionData.from_table(pd.DataFrame(rows, columns=["userHash", "itemId", "timestamp"]))
    model = ItemKNN(k=1, shrink=0).fit(data)
    assert model.similarity.toarray().argmax(1).tolist() == [1, 0, 3, 2]
    assert model.similarity[0, 1] == pytest.approx(1.0, rel=1e-5)
    user_model = UserKNN(k=5, shrink=0).fit(data)
    assert user_model.similarity[0, 1] == pytest.approx(1.0, rel=1e-5) and user_model.similarity[0, 15] == 0


def test_sasrec_defaults_learn_a_deterministic_cycle_on_small_data():
    # 100 users: one epoch is a single step, so a fixed epoch count (the old default: 30 epochs, patience 3) stops
    # after 30 steps (Recall@1 0.82 here), far from convergence; the step budget trains at least `min_steps` steps.
    data = InteractionData.from_table(_cycle_table(n_users=100, n_items=100, length=8))
    result = evaluate_models(data, {"pop": Pop(), "sasrec": SASRec()}, ks=(1, 5))
    assert result.metrics["sasrec"]["test"]["recall@1"] > 0.95
    assert result.metrics["pop"]["test"]["recall@1"] < 0.3
    schedule = result.models["sasrec"].schedule_
    assert schedule.steps_per_epoch == 1 and schedule.max_steps == 500


def test_item2vec_and_two_tower_learn_planted_clusters():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(120):
        items = rng.choice(np.arange(10) + 10 * (u % 2), 6, replace=False)
        rows += [(u, int(i), t) for t, i in enumerate(items)]
    data = InteractionData.from_table(pd.DataFrame(rows, columns=["userHash", "itemId", "timestamp"]))
    vectors = Item2Vec(dim=16, window=5, max_steps=200).fit(data).item_vectors
    sim = vectors @ vectors.T
    assert sim[:10, :10].mean() > sim[:10, 10:].mean() + 0.3
    tower = TwoTower(dim=16, batch_size=64, max_steps=150).fit(data)
    scores = tower.score(np.array([0, 1]))  # user 0 likes items 0-9, user 1 likes items 10-19
    assert scores[0, :10].mean() > scores[0, 10:].mean() and scores[1, 10:].mean() > scores[1, :10].mean()
    with pytest.raises(ValueError, match="no .*row for 17 of 20 items"):
        TwoTower(item_features=pd.DataFrame(np.zeros((3, 4)), index=data.item_ids[:3])).fit(data)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip_gives_identical_scores(name, tmp_path):
    data = InteractionData.from_table(_cycle_table(n_users=20))
    small = {"item2vec": dict(max_steps=2), "twotower": dict(max_steps=2), "sasrec": dict(max_steps=2, dim=16)}
    model = MODELS[name](**small.get(name, {})).fit(data)
    model.save_pretrained(tmp_path / name)
    loaded = Recommender.from_pretrained(tmp_path / name)
    users = np.arange(5)
    np.testing.assert_allclose(loaded.score(users), model.score(users), rtol=1e-5, atol=1e-6)
    assert (tmp_path / name / "README.md").read_text().startswith("---")
    with pytest.raises(ValueError, match="not a"):
        (ItemKNN if name != "itemknn" else Pop).from_pretrained(tmp_path / name)


def test_recommend_masks_seen_and_checks_k_and_vocab():
    data = InteractionData.from_table(_cycle_table(n_users=10, n_items=8, length=3))
    model = Pop().fit(data)
    top = model.recommend(np.array([0]), k=5)
    assert not set(top[0]) & set(data.sequences()[0])
    with pytest.raises(ValueError, match="larger than the catalogue"):
        model.recommend(np.array([0]), k=9)
    other = InteractionData.from_table(_cycle_table(n_users=10, n_items=6, length=3))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        model.check_vocabulary(other)


def test_retrieval_index_faiss_matches_numpy():
    rng = np.random.default_rng(0)
    items, queries = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(20, 16)).astype(np.float32)
    faiss_scores, faiss_top = RetrievalIndex(items).search(queries, 10)
    np_scores, np_top = RetrievalIndex(items, kind="numpy").search(queries, 10)
    np.testing.assert_array_equal(faiss_top, np_top)
    np.testing.assert_allclose(faiss_scores, np_scores, rtol=1e-4)
    with pytest.raises(ValueError, match="kind"):
        RetrievalIndex(items, kind="lsh")


def test_recommend_cli_end_to_end(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    _cycle_table(n_users=30).to_parquet(path)
    out = tmp_path / "out"
    assert main(["recommend", str(path), "--models", "pop,itemknn", "--k", "1,5", "--output-dir", str(out)]) == 0
    assert "| itemknn |" in capsys.readouterr().out
    assert (out / "recommendation_all.png").exists() and (out / "recommendation_all.json").exists()
    assert main(["recommend", str(path), "--models", "magic"]) == 2
    assert main(["recommend", str(path), "--models", "pop", "--k", "100"]) == 2


def test_sparse_ranks_equal_dense_ranks():
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 4, (30, 12)).astype(float) * (rng.random((30, 12)) < 0.4)
    exclude = sp.csr_matrix((rng.random((30, 12)) < 0.2).astype(float))
    targets = rng.integers(0, 12, 30)
    from imagegem_hf.recsys.metrics import sparse_target_ranks

    for mask in (None, exclude):
        np.testing.assert_array_equal(
            sparse_target_ranks(sp.csr_matrix(dense), targets, mask), target_ranks(dense, targets, mask)
        )


def test_recommend_example_script_saves_the_best_model(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "t.parquet"
    _cycle_table(n_users=30, n_items=12, length=6).to_parquet(path)
    script = Path(__file__).parents[2] / "examples" / "recommend.py"
    out = subprocess.run(
        [sys.executable, str(script), str(path), "--k", "1,5", "--save-dir", str(tmp_path / "best")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "best:" in out and (tmp_path / "best" / "model.safetensors").exists()
    assert Recommender.from_pretrained(tmp_path / "best").item_ids.tolist() == sorted(f"item{i}" for i in range(12))


def test_step_schedule_scales_with_the_data():
    small = StepSchedule.resolve(n_examples=943, batch_size=128)  # MovieLens-100K: 8 steps per epoch
    assert (small.steps_per_epoch, small.max_steps, small.eval_every, small.min_steps) == (8, 800, 25, 500)
    large = StepSchedule.resolve(n_examples=1_000_000, batch_size=128)  # 7,813 steps per epoch
    assert (large.steps_per_epoch, large.max_steps, large.eval_every) == (7813, 200_000, 1000)
    tiny = StepSchedule.resolve(n_examples=10, batch_size=128, max_steps=40)
    assert (tiny.max_steps, tiny.min_steps, tiny.eval_every, tiny.warmup_steps) == (40, 40, 25, 4)
    assert [tiny.lr_factor(s) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]


def test_early_stopping_counts_evaluations_and_waits_for_min_steps():
    scores = iter([0.1, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])  # best at the 2nd evaluation (step 20)
    weight = torch.nn.Linear(1, 1, bias=False)
    snapshots = {}

    def validate():
        snapshots[len(snapshots) + 1] = weight.weight.item()
        return next(scores)

    schedule = StepSchedule(steps_per_epoch=1, max_steps=1000, eval_every=10, patience=2, min_steps=60, warmup_steps=0)
    history = run_schedule(
        schedule,
        weight,
        torch.optim.SGD(weight.parameters(), lr=0.01),
        lambda idx: (weight(torch.ones(1, 1)) - 5).pow(2).sum(),
        iter(lambda: np.zeros(1), None),
        validate=validate,
    )
    # Patience (2 evaluations without improvement) runs out at step 40, but stopping waits for min_steps = 60.
    assert [r["step"] for r in history] == [10, 20, 30, 40, 50, 60]
    assert weight.weight.item() == snapshots[2]  # the best weights are restored
    no_validation = run_schedule(
        schedule,
        weight,
        torch.optim.SGD(weight.parameters(), lr=0.0),
        lambda idx: weight.weight.sum(),
        iter(lambda: np.zeros(1), None),
    )
    assert no_validation[-1]["step"] == 1000  # without validation data the whole budget is trained


class _RecordsValidation(Pop):
    name = "records_validation"

    def fit(self, train, validation=None):
        self.validation_seen = validation
        return super().fit(train, validation)


def test_evaluate_models_passes_validation_to_every_model():
    data = InteractionData.from_table(_cycle_table(n_users=20))
    recorder = _RecordsValidation()
    result = evaluate_models(data, {"pop": recorder}, ks=(1,))
    validation = result.splits[1]
    assert recorder.validation_seen is not None
    np.testing.assert_array_equal(recorder.validation_seen.item_index, validation.item_index)
    train = result.splits[0]
    for name, klass in sorted(MODELS.items()):  # the same signature everywhere
        small = {"item2vec": dict(max_steps=2), "twotower": dict(max_steps=2), "sasrec": dict(max_steps=2)}
        klass(**small.get(name, {})).fit(train, validation=validation)


def test_sasrec_gives_the_same_states_with_padding_columns_cut():
    from imagegem_hf.recsys.sasrec import SASRecNetwork, left_pad, trim_padding

    torch.manual_seed(0)
    network = SASRecNetwork(n_items=30, dim=16, layers=2, heads=2, max_len=12, dropout=0.0).eval()
    full = left_pad([np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6])], max_len=12)
    trimmed = trim_padding(full)
    assert trimmed.shape == (2, 5)
    with torch.no_grad():
        states_full = network(torch.from_numpy(full))[:, -5:]
        states_trimmed = network(torch.from_numpy(trimmed))
    mask = torch.from_numpy(trimmed > 0)
    torch.testing.assert_close(states_trimmed[mask], states_full[mask], rtol=1e-5, atol=1e-5)
