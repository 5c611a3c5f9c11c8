"""`imagegem preference build|train|eval`: per-user preference data, two-stage training and paper 003's tables."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("preference", help="Personal preference prediction (preference prototypes).")
    commands = parser.add_subparsers(dest="preference_command", required=True, metavar="SUBCOMMAND")

    build = commands.add_parser("build", help="Pick-a-Pic-style records → per-user splits (Hub-shaped folder).")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", help="Parquet/JSON-lines with user_id, image_0, image_1, label_0, caption.")
    source.add_argument("--synthetic-users", type=int, help="Build synthetic users with a planted colour instead.")
    build.add_argument("--image-bytes-columns", default=None, help="Encoded-image columns (jpg_0,jpg_1).")
    build.add_argument("--output-dir", required=True, help="Where to write pairs/, images/ and README.md.")
    build.add_argument("--min-liked", type=int, default=11, help="Keep users with at least this many liked images.")
    build.add_argument("--n-ref", type=int, default=8, help="Reference pairs per example.")
    build.add_argument("--val-users", type=int, default=89, help="Validation users.")
    build.add_argument("--test-users", type=int, default=70, help="Unseen test users.")
    build.add_argument("--seen-users", type=int, default=70, help="Training users giving held-out (seen) test pairs.")
    build.add_argument("--seen-pairs", type=int, default=2, help="Held-out pairs per seen user.")
    build.add_argument("--seed", type=int, default=0, help="Seed of the split and the reference draws.")
    build.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    build.add_argument(
        "--source-dataset",
        default=None,
        help="Hub id of the records' dataset (e.g. yuvalkirstain/pickapic_v2): the card's source_datasets, and "
        "its license when cached.",
    )
    build.add_argument(
        "--license",
        default=None,
        help="The card's license (a Hub license id, e.g. mit); default: the source dataset's, apache-2.0 for "
        "--synthetic-users.",
    )
    build.set_defaults(func=_build)

    train = commands.add_parser("train", help="One training stage (1: LoRA + vision tower, 2: prototypes only).")
    train.add_argument("--dataset", required=True, help="Folder or Hub repo from `imagegem preference build`.")
    train.add_argument("--model", required=True, help="Stage 1: a VLM (path or repo id); stage 2: the stage-1 model.")
    train.add_argument("--stage", type=int, choices=[1, 2], default=1, help="Training stage.")
    train.add_argument("--output-dir", required=True, help="Checkpoints and the final model (<output-dir>/model).")
    train.add_argument("--max-steps", type=int, default=5000, help="Optimizer steps (paper: 5000, then 16000).")
    train.add_argument("--learning-rate", type=float, default=1e-5, help="Learning rate (paper: 1e-5).")
    train.add_argument("--batch-size", type=int, default=2, help="Pairs per device and micro-batch.")
    train.add_argument(
        "--gradient-accumulation-steps", type=int, default=1, help="Micro-batches per optimizer step (paper: 4)."
    )
    train.add_argument(
        "--eval-steps", type=int, default=500, help="Validate on the validation users every N steps (0: never)."
    )
    train.add_argument(
        "--model-dtype",
        default="float32",
        help="dtype of the backbone in either stage: float32, bfloat16, float16 or auto (prototypes stay float32).",
    )
    train.add_argument(
        "--load-in-4bit", action="store_true", help="Load the backbone in 4 bit (QLoRA in stage 1; CUDA only)."
    )
    train.add_argument("--n-ref", type=int, default=8, help="Reference pairs per example.")
    train.add_argument("--num-prototypes", type=int, default=10, help="Prototypes added in stage 2.")
    train.add_argument("--seed", type=int, default=0, help="Seed.")
    train.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="Upload the trained model folder (with its card)."
    )
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="Pairwise / 1-vs-3 accuracy, seen vs unseen, N_ref curve, baselines.")
    evaluate.add_argument("--model", required=True, help="A trained preference model folder or repo id.")
    evaluate.add_argument("--dataset", required=True, help="Folder or Hub repo from `imagegem preference build`.")
    evaluate.add_argument("--clip", default=None, help="A CLIP model (path or repo id) for the CLIP-score baseline.")
    evaluate.add_argument("--pickscore", default=None, help="A PickScore model (path or repo id) as a baseline.")
    evaluate.add_argument("--similarity-users", type=int, default=10, help="Users in the prototype similarity.")
    evaluate.add_argument("--batch-size", type=int, default=8, help="Sequences per forward pass.")
    evaluate.add_argument("--output-dir", default="preference_eval", help="Where to write the table and figures.")
    evaluate.set_defaults(func=_eval)


def _build(args: argparse.Namespace) -> int:
    from imagegem_hf.preference.data import (
        build_preference_dataset,
        build_user_splits,
        group_pickapic_records,
        save_preference_dataset,
        synthetic_pickapic_records,
    )

    split_args = dict(
        min_liked=args.min_liked,
        n_ref=args.n_ref,
        val_users=args.val_users,
        test_users=args.test_users,
        seen_users=args.seen_users,
        seen_pairs_per_user=args.seen_pairs,
        seed=args.seed,
    )
    if args.synthetic_users:
        records, images = synthetic_pickapic_records(n_users=args.synthetic_users, seed=args.seed)
        splits = build_user_splits(group_pickapic_records(records), **split_args)
        source = "synthetic users with a planted colour"
        folder = save_preference_dataset(
            splits,
            args.output_dir,
            images,
            source=source,
            overwrite=args.overwrite,
            license=args.license or "apache-2.0",  # generated here, from no one else's data
        )
        counts = {name: (len(examples), len({e.user_id for e in examples})) for name, examples in splits.items()}
    else:
        columns = tuple(args.image_bytes_columns.split(",")) if args.image_bytes_columns else None
        if columns is not None and len(columns) != 2:
            raise ValueError("--image-bytes-columns takes two comma-separated columns (image_0's, image_1's).")
        summary = build_preference_dataset(
            args.records,
            args.output_dir,
            columns,
            overwrite=args.overwrite,
            source_dataset=args.source_dataset,
            license=args.license,
            **split_args,
        )
        folder = summary.path
        counts = {name: (c["examples"], c["users"]) for name, c in summary.counts.items()}
        for kind, n in sorted(summary.issues.counts.items()):
            print(f"{n} {kind}")
    for name, (n_examples, n_users) in counts.items():
        print(f"{name}: {n_examples} examples, {n_users} users")
    print(f"dataset → {folder}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from imagegem_hf.preference.trainer import PreferencePrototypeTrainingConfig, train_from_dataset

    config = PreferencePrototypeTrainingConfig(
        output_dir=args.output_dir,
        stage=args.stage,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=1e-2,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else None,
        model_dtype=args.model_dtype,
        load_in_4bit=args.load_in_4bit,
        n_ref=args.n_ref,
        num_prototypes=args.num_prototypes,
        seed=args.seed,
        report_to="none",
    )
    path = train_from_dataset(args.model, args.dataset, config)
    print(f"model → {path}")
    if args.push_to_hub:
        from imagegem_hf.hub import push_folder

        print(f"pushed → {push_folder(path, args.push_to_hub)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoProcessor

    from imagegem_hf.hub import resolve
    from imagegem_hf.preference import PreferencePrototypeModel, PreferenceSequenceBuilder
    from imagegem_hf.preference.data import load_preference_dataset
    from imagegem_hf.preference.evaluate import evaluate_preference

    model_dir = resolve(args.model)
    model = PreferencePrototypeModel.from_pretrained(model_dir).eval()
    builder = PreferenceSequenceBuilder.from_config(AutoProcessor.from_pretrained(model_dir), model.config)
    splits, images = load_preference_dataset(args.dataset)
    if not images:
        raise ValueError(f"{args.dataset} has no images table; rebuild it with --image-bytes-columns.")
    baselines = {}
    if args.clip:
        from imagegem_hf.scoring import CLIPScore

        baselines["CLIP score"] = CLIPScore.from_pretrained(args.clip)
    if args.pickscore:
        from imagegem_hf.scoring import PickScore

        baselines["PickScore"] = PickScore.from_pretrained(args.pickscore)
    test_sets = {"seen": splits.get("test_seen", []), "unseen": splits.get("test_unseen", [])}
    result = evaluate_preference(
        model,
        builder,
        {k: v for k, v in test_sets.items() if v},
        images.__getitem__,
        baselines=baselines,
        user_similarity_users=args.similarity_users,
        batch_size=args.batch_size,
    )
    print(result.markdown())
    for name, path in result.save(args.output_dir).items():
        print(f"{name} → {path}")
    return 0
