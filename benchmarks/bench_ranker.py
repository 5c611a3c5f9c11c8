"""Candidates scored per second: batched generation (all trials of all users share batches) vs one prompt per
candidate, same tiny VLM, same users. Target ≥ 3×. On a CUDA machine it also measures a real-size random-weight
LLaVA-shaped VLM (bf16).

Run: `python benchmarks/bench_ranker.py [--users 8 --candidates 10]`.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
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
