"""Candidates scored per second: batched generation (all trials of all users share batches) vs one prompt per
candidate, same tiny VLM, same users. Target ≥ 3×. On a CUDA machine it also measures a real-size random-weight
LLaVA-shaped VLM (bf16). Through an OpenAI-compatible server (a local stand-in answering after 50 ms, in its own
process): 16 requests in flight vs 1, target ≥ 8×.

Run: `python benchmarks/bench_ranker.py [--users 8 --candidates 10]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from imagegem_hf.ranker import RankerConfig, RankItem, VLMRankerPipeline
from imagegem_hf.ranker.items import placeholder_image
from imagegem_hf.testing import tiny_vlm


def requests(users: int, candidates: int) -> list[tuple[str, list[RankItem]]]:
    return [
        (
            f"profile of user {u}: likes red cars",
            [
                RankItem(f"{u}-{c}", image=placeholder_image(f"{u}-{c}", 16), text=f"a car, style {c}")
                for c in range(candidates)
            ],
        )
        for u in range(users)
    ]


def measure(pipeline: VLMRankerPipeline, work, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipeline.rank_batch(work, seed=0)
        best = min(best, time.perf_counter() - start)
    return best


def run(model, processor, label: str, users: int, candidates: int, max_new_tokens: int) -> None:
    work = requests(users, candidates)
    scored = users * candidates
    batched = VLMRankerPipeline(
        model,
        processor,
        RankerConfig(k_subset=candidates, n_trials=1, batch_size=16, max_new_tokens=max_new_tokens, max_retries=0),
    )
    single = VLMRankerPipeline(
        model,
        processor,
        RankerConfig(k_subset=1, n_trials=candidates, batch_size=1, max_new_tokens=max_new_tokens, max_retries=0),
    )
    ours, baseline = measure(batched, work), measure(single, work)
    ratio = (scored / ours) / (scored / baseline)
    print(f"{label}: {scored} candidates; batched {scored / ours:.1f}/s, one-per-candidate {scored / baseline:.1f}/s")
    print(
        f"RESULT ranker_{label}_candidates_per_s ours={scored / ours:.1f} baseline={scored / baseline:.1f} "
        f"ratio={ratio:.2f} target=3 {'PASS' if ratio >= 3 else 'FAIL'}"
    )


def endpoint(users: int, candidates: int, latency: float) -> None:
    """Candidates/s through an OpenAI-compatible server answering after `latency` s: 16 requests in flight vs 1."""
    server = subprocess.Popen(
        [sys.executable, "-m", "imagegem_hf.fetch.local_server", "--chat", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1"
        work = requests(users, candidates)
        config = RankerConfig(k_subset=5, n_trials=4, max_retries=0)
        rankers = {c: VLMRankerPipeline.from_endpoint(url, "stand-in", config, concurrency=c) for c in (1, 16)}
        measure(rankers[16], work, repeats=1)  # warm-up: imports and the first connections
        elapsed = {c: [] for c in rankers}
        for _ in range(2):  # interleaved repeats: the machine's load drifts
            for c, ranker in rankers.items():
                elapsed[c].append(measure(ranker, work, repeats=1))
        rates = {c: users * candidates / min(times) for c, times in elapsed.items()}
    finally:
        server.terminate()
        server.wait(timeout=10)
    ratio = rates[16] / rates[1]
    print(
        f"endpoint: {users * candidates} candidates, T=4 trials of k=5, {latency * 1000:.0f} ms per request; "
        f"concurrency 1 {rates[1]:.1f}/s, concurrency 16 {rates[16]:.1f}/s"
    )
    print(
        f"RESULT ranker_endpoint_concurrency_candidates_per_s ours={rates[16]:.1f} baseline={rates[1]:.1f} "
        f"ratio={ratio:.2f} target=>=8 {'PASS' if ratio >= 8 else 'FAIL'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05, help="Per-request latency of the endpoint section.")
    args = parser.parse_args()
    endpoint(args.users, args.candidates, args.latency)
    model, processor = tiny_vlm()
    run(model, processor, "tiny", args.users, args.candidates, args.max_new_tokens)
    if torch.cuda.is_available():
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig.from_dict(model.config.to_dict())
        config.text_config.update(
            dict(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
            )
        )
        big = LlavaForConditionalGeneration(config).to("cuda", torch.bfloat16).eval()
        run(big, processor, "7b_random_bf16", args.users, args.candidates, args.max_new_tokens)
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    else:
        print("No CUDA device: the real-size measurement is skipped.")


if __name__ == "__main__":
    main()
