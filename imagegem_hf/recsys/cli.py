"""`imagegem recommend`: leave-one-last evaluation of recommenders on any interaction table."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recommend", help="Fit and evaluate recommenders (leave-one-last, full ranking).")
    parser.add_argument("data", help="Parquet/CSV table, or a dataset folder / Hub repo id (config: --config).")
    parser.add_argument(
        "--models",
        default="pop,itemknn,userknn,item2vec,twotower,sasrec",
        help="Comma-separated: random, pop, itemknn, userknn, item2vec, twotower, sasrec.",
    )
    parser.add_argument("--k", default="10,50,100", help="Comma-separated cut-offs.")
    parser.add_argument(
        "--item-type",
        choices=["image", "model"],
        default=None,
        help="Keep only this itemType (ImageGem interactions).",
    )
    parser.add_argument("--config", default="interactions", help="Config to read from a dataset folder/repo.")
    parser.add_argument("--user-col", default="userHash", help="User id column.")
    parser.add_argument("--item-col", default="itemId", help="Item id column.")
    parser.add_argument("--time-col", default="timestamp", help="Timestamp column.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every model.")
    parser.add_argument("--output-dir", default="recommend_output", help="Where to write the table, JSON and plot.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from imagegem_hf.recsys import InteractionData
    from imagegem_hf.recsys.evaluate import default_models, evaluate_models

    available = default_models(args.seed)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ValueError(f"Unknown model(s) {unknown}; choose from {sorted(available)}.")
    data = InteractionData.from_table(
        args.data,
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        item_type=args.item_type,
        config=args.config,
    )
    ks = tuple(int(k) for k in args.k.split(","))
    result = evaluate_models(data, {n: available[n] for n in names}, ks=ks)
    title = f"recommendation_{args.item_type or 'all'}"
    paths = result.save(Path(args.output_dir), title)
    print(result.table("test"))
    for name, path in paths.items():
        print(f"{name} → {path}")
    return 0
