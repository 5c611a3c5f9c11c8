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
    images = parser.add_argument_group(
        "Image item embeddings (--item-type image on an ImageGem dataset folder; initialise the Two-Tower's items)"
    )
    images.add_argument(
        "--image-embedding-column", default=None, help="Vector column of the images config holding an embedding."
    )
    images.add_argument(
        "--clip-model",
        default="openai/clip-vit-large-patch14",
        help="CLIP path or repo id that embeds the stored pixels when there is no embedding column (cached as "
        "parquet in <dataset>.image_embeddings/, resumable).",
    )
    images.add_argument(
        "--pixels", default=None, help="An `imagegem dataset fetch-images` output folder with the images' pixels."
    )
    images.add_argument("--embedding-batch-size", type=int, default=64, help="CLIP batch size.")
    images.add_argument("--device", default="cpu", help="CLIP device.")
    rerank = parser.add_argument_group("VLM re-ranking (ImageGem §4.2; needs an ImageGem dataset folder)")
    rerank.add_argument("--rerank", choices=["none", "vlm"], default="none", help="Re-rank CF candidates with a VLM.")
    rerank.add_argument("--vlm", default=None, help="Image-text-to-text model path or repo id (e.g. a Qwen2-VL).")
    rerank.add_argument(
        "--vlm-endpoint",
        default=None,
        help="Instead of --vlm: an OpenAI-compatible chat-completions API root serving the VLM (vllm serve, TGI), "
        "e.g. http://localhost:8000/v1.",
    )
    rerank.add_argument("--vlm-model", default=None, help="With --vlm-endpoint: the served model's name.")
    rerank.add_argument("--vlm-concurrency", type=int, default=16, help="With --vlm-endpoint: requests in flight.")
    rerank.add_argument("--rerank-model", default="sasrec", help="CF model whose top-M candidates are re-ranked.")
    rerank.add_argument("--top-m", type=int, default=10, help="CF candidates re-ranked per user (M).")
    rerank.add_argument("--history", type=int, default=5, help="Latest history items in the profile (H).")
    rerank.add_argument("--trials", type=int, default=4, help="Randomized scoring trials per user (T).")
    rerank.add_argument("--subset-size", type=int, default=5, help="Candidates per trial (k).")
    rerank.add_argument("--rerank-users", type=int, default=20, help="Users re-ranked (the paper uses 20).")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from imagegem_hf.recsys import InteractionData
    from imagegem_hf.recsys.evaluate import default_models, evaluate_models

    available = default_models(args.seed)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ValueError(f"Unknown model(s) {unknown}; choose from {sorted(available)}.")
    if args.rerank == "vlm" and ((args.vlm is None) == (args.vlm_endpoint is None) or args.item_type is None):
        raise ValueError(
            "--rerank vlm needs either --vlm MODEL or --vlm-endpoint URL --vlm-model NAME, and --item-type "
            "image|model (on an ImageGem dataset)."
        )
    if args.vlm_endpoint is not None and not args.vlm_model:
        raise ValueError("--vlm-endpoint needs --vlm-model NAME (the name the server serves the model under).")
    if args.rerank == "vlm" and args.rerank_model not in names:
        raise ValueError(f"--rerank-model {args.rerank_model!r} must be one of --models ({', '.join(names)}).")
    data = InteractionData.from_table(
        args.data,
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        item_type=args.item_type,
        config=args.config,
    )
    if args.item_type == "image" and "twotower" in names:
        available["twotower"] = _image_two_tower(args, data)
    ks = tuple(int(k) for k in args.k.split(","))
    result = evaluate_models(data, {n: available[n] for n in names}, ks=ks)
    title = f"recommendation_{args.item_type or 'all'}"
    paths = result.save(Path(args.output_dir), title)
    print(result.table("test"))
    for name, path in paths.items():
        print(f"{name} → {path}")
    if args.rerank == "vlm":
        _rerank(args, result, Path(args.output_dir))
    return 0


def _image_two_tower(args: argparse.Namespace, data):
    from imagegem_hf.hub import resolve
    from imagegem_hf.recsys import TwoTower
    from imagegem_hf.recsys.image_features import image_item_features

    features = image_item_features(
        resolve(args.data, repo_type="dataset"),
        data.item_ids,
        embedding_column=args.image_embedding_column,
        clip_model=args.clip_model,
        batch_size=args.embedding_batch_size,
        device=args.device,
        pixels_dir=args.pixels,
    )
    if features is None:
        print(
            "The dataset stores no pixels and no --image-embedding-column was given: the Two-Tower's image "
            "embeddings start at random (each image has one interaction, so expect near-random results)."
        )
    return TwoTower(item_features=features, seed=args.seed)


def _rerank(args: argparse.Namespace, result, output_dir: Path) -> None:
    from imagegem_hf.hub import resolve
    from imagegem_hf.ranker import RankerConfig, VLMRankerPipeline
    from imagegem_hf.ranker.items import imagegem_item_loader
    from imagegem_hf.ranker.two_stage import rerank_and_evaluate
    from imagegem_hf.recsys.evaluate import candidates_payload

    payload = candidates_payload(result, args.rerank_model, top_m=args.top_m, history=args.history)
    config = RankerConfig(item_type=args.item_type, k_subset=args.subset_size, n_trials=args.trials)
    if args.vlm_endpoint is not None:
        pipeline = VLMRankerPipeline.from_endpoint(
            args.vlm_endpoint, args.vlm_model, config, concurrency=args.vlm_concurrency
        )
    else:
        pipeline = VLMRankerPipeline.from_pretrained(args.vlm, **vars(config))
    loader = imagegem_item_loader(resolve(args.data, repo_type="dataset"), args.item_type)
    report = rerank_and_evaluate(
        payload,
        pipeline,
        loader,
        history_size=args.history,
        top_m=args.top_m,
        seed=args.seed,
        max_users=args.rerank_users,
    )
    print(report.table())
    for name, path in report.save(output_dir, f"rerank_{args.item_type}").items():
        print(f"{name} → {path}")
