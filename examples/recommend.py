"""Fit and evaluate recommendation baselines on any interaction table, then save the best model.

python examples/recommend.py demo_output/dataset --item-type model --save-dir sasrec-models
python examples/recommend.py ratings.parquet --user-col user_id --item-col movie_id --time-col ts
"""

from __future__ import annotations

import argparse

from imagegem_hf.recsys import InteractionData
from imagegem_hf.recsys.evaluate import default_models, evaluate_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "data", help="Parquet/CSV table, or a dataset folder / Hub repo id with an interactions config."
    )
    parser.add_argument("--item-type", choices=["image", "model"], default=None, help="ImageGem itemType filter.")
    parser.add_argument("--user-col", default="userHash")
    parser.add_argument("--item-col", default="itemId")
    parser.add_argument("--time-col", default="timestamp")
    parser.add_argument("--k", default="10,50,100", help="Comma-separated cut-offs.")
    parser.add_argument("--save-dir", default=None, help="Save the model with the best test NDCG@10 here.")
    parser.add_argument("--push-to-hub", default=None, help="Also push it to this Hub repo id.")
    args = parser.parse_args()

    data = InteractionData.from_table(
        args.data, user_col=args.user_col, item_col=args.item_col, time_col=args.time_col, item_type=args.item_type
    )
    ks = tuple(int(k) for k in args.k.split(","))
    result = evaluate_models(data, default_models(), ks=ks)
    print(result.table("test"))
    best = max(result.metrics, key=lambda name: result.metrics[name]["test"][f"ndcg@{ks[0]}"])
    print(f"best: {best}")
    if args.save_dir:
        result.models[best].save_pretrained(args.save_dir, metrics=result.metrics[best]["test"])
        print(f"saved → {args.save_dir}")
    if args.push_to_hub:
        print(result.models[best].push_to_hub(args.push_to_hub))


if __name__ == "__main__":
    main()
