r"""Two-stage generative recommendation: CF retrieval, then VLM re-ranking with explanations (ImageGem §4.2).

    python examples/vlm_rank.py demo_output/dataset --item-type model --vlm Qwen/Qwen2-VL-2B-Instruct --users 20
    python examples/vlm_rank.py your-org/imagegem --item-type image --vlm mistral-community/pixtral-12b \
        --dtype bfloat16

Fits the CF model on a leave-one-last split, re-ranks its top-M for users whose test item is among them, and
prints Table 7 (Avg Rank, Rank Std, Rec@5, NDCG@5) with a stability report.
"""

from __future__ import annotations

import argparse

import torch

from imagegem_hf.hub import resolve
from imagegem_hf.ranker import VLMRankerPipeline
from imagegem_hf.ranker.items import imagegem_item_loader
from imagegem_hf.ranker.two_stage import rerank_and_evaluate
from imagegem_hf.recsys import MODELS, InteractionData
from imagegem_hf.recsys.evaluate import candidates_payload, evaluate_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="ImageGem dataset folder or Hub repo id.")
    parser.add_argument("--item-type", choices=["image", "model"], required=True)
    parser.add_argument("--vlm", required=True, help="Image-text-to-text model path or repo id.")
    parser.add_argument("--cf-model", choices=sorted(MODELS), default="sasrec", help="First-stage recommender.")
    parser.add_argument("--users", type=int, default=20, help="Users re-ranked (the paper uses 20).")
    parser.add_argument("--top-m", type=int, default=10)
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--subset-size", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default="vlm_rank_output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = InteractionData.from_table(args.data, item_type=args.item_type)
    result = evaluate_models(data, {args.cf_model: MODELS[args.cf_model]()}, ks=(5, 10))
    payload = candidates_payload(result, args.cf_model, top_m=args.top_m, history=args.history)
    config = dict(item_type=args.item_type, k_subset=args.subset_size, n_trials=args.trials)
    pipeline = VLMRankerPipeline.from_pretrained(
        args.vlm, dtype=getattr(torch, args.dtype), device=args.device, **config
    )
    loader = imagegem_item_loader(resolve(args.data, repo_type="dataset"), args.item_type)
    report = rerank_and_evaluate(
        payload, pipeline, loader, history_size=args.history, top_m=args.top_m, seed=args.seed, max_users=args.users
    )
    print(report.table())
    print("Stability:", report.stability)
    for name, path in report.save(args.output_dir, f"vlm_rank_{args.item_type}").items():
        print(f"{name} → {path}")


if __name__ == "__main__":
    main()
