"""`imagegem dataset ...`: synth, build, stats, subsets, pairs, push, fetch-images, crawl."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register `imagegem dataset` and its subcommands."""
    parser = subparsers.add_parser("dataset", help="Build, inspect and publish ImageGem-format datasets.")
    commands = parser.add_subparsers(dest="dataset_command", required=True, metavar="SUBCOMMAND")

    synth = commands.add_parser("synth", help="Write a synthetic Civitai-shaped raw dump.")
    synth.add_argument("output_dir", help="Folder for the raw pages (images/, models/).")
    synth.add_argument("--users", type=int, default=2000, help="Number of users.")
    synth.add_argument("--seed", type=int, default=0, help="Seed (same seed, same bytes).")
    synth.set_defaults(func=_synth)

    build = commands.add_parser("build", help="Build the Hub-shaped dataset folder from raw API pages.")
    build.add_argument("raw_dir", help="Folder with images/ and models/ API pages (.json, .jsonl, .gz).")
    build.add_argument("output_dir", help="Dataset folder to create.")
    build.add_argument("--salt", default="", help="Salt of the username hashes.")
    build.add_argument("--max-browsing-level", type=int, default=None, help="Drop images above this level.")
    build.add_argument(
        "--toxicity",
        choices=["none", "detoxify"],
        default="none",
        help="Prompt toxicity filter (detoxify needs the `safety` extra and downloads its weights).",
    )
    build.add_argument(
        "--overwrite", action="store_true", help="Replace an output folder written by an earlier build (only such)."
    )
    build.set_defaults(func=_build)

    stats = commands.add_parser("stats", help="Statistics tables and figures of a built dataset.")
    stats.add_argument("dataset_dir", help="A built dataset folder.")
    stats.add_argument("--out", default=None, help="Output folder (default: <dataset_dir>/../stats).")
    stats.set_defaults(func=_stats)

    subsets = commands.add_parser("subsets", help="Image/model recommendation subsets (Table 3).")
    subsets.add_argument("dataset_dir", help="A built dataset folder.")
    subsets.add_argument("output_dir", help="Where to write images.parquet and models.parquet.")
    subsets.set_defaults(func=_subsets)

    pairs = commands.add_parser("pairs", help="Fill the preference_pairs config (prompt clusters, min-max pairs).")
    pairs.add_argument("dataset_dir", help="A built dataset folder.")
    pairs.add_argument(
        "--score",
        default="hpsv2",
        help="'hpsv2' (default, as in the paper), 'pickscore' or 'clip' (reward models on the image files of "
        "--image-dir), 'toy' (the toy world's ToyReward, on the image files), 'reactions' (implicit feedback), or a "
        "numeric column of the images table.",
    )
    pairs.add_argument(
        "--image-dir",
        default=None,
        help="Folder of <imageId>.jpg|png|webp files, or a `fetch-images` output folder (reward scores).",
    )
    pairs.add_argument(
        "--scorer-path", default=None, help="Path or repo id of the reward model (default: the paper's)."
    )
    pairs.add_argument("--device", default="cpu", help="Device of the reward model.")
    pairs.add_argument("--max-images", type=int, default=None, help="Use a seeded sample of this many images.")
    pairs.add_argument("--pairs-per-cluster", type=int, default=1, help="Min-max pairs per prompt cluster.")
    pairs.add_argument("--min-margin", type=float, default=0.0, help="Minimum score difference of a pair.")
    pairs.add_argument(
        "--exchange-dir",
        default=None,
        help="Also write the pairs in the jpg_0/jpg_1/label_0/caption exchange format here (needs --image-dir).",
    )
    pairs.set_defaults(func=_pairs)

    push = commands.add_parser("push", help="Upload a built dataset folder to the Hub.")
    push.add_argument("dataset_dir", help="A built dataset folder.")
    push.add_argument("repo_id", help="Target dataset repo, org/name.")
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.set_defaults(func=_push)

    from imagegem_hf.fetch.cli import register_dataset_commands

    register_dataset_commands(commands)


def _synth(args: argparse.Namespace) -> int:
    from imagegem_hf.data.synth import generate_raw_sample

    counts = generate_raw_sample(args.output_dir, users=args.users, seed=args.seed)
    print(f"Wrote {counts['images']:,} image and {counts['models']:,} model records to {args.output_dir}.")
    return 0


def _build(args: argparse.Namespace) -> int:
    from imagegem_hf.data.build import build_dataset

    scorer = None
    if args.toxicity == "detoxify":
        from imagegem_hf.data.safety import DetoxifyScorer

        scorer = DetoxifyScorer()
    report = build_dataset(
        args.raw_dir,
        args.output_dir,
        salt=args.salt,
        toxicity_scorer=scorer,
        max_browsing_level=args.max_browsing_level,
        overwrite=args.overwrite,
    )
    print(report.table1())
    print(f"Quarantined: {report.rejected or 'none'} (rejected.jsonl); dropped: {report.dropped or 'none'}.")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from imagegem_hf.data.stats import dataset_statistics

    out = Path(args.out) if args.out else Path(args.dataset_dir).parent / "stats"
    written = dataset_statistics(args.dataset_dir, out)
    print(written["statistics"].read_text())
    for name, path in written.items():
        print(f"{name} → {path}")
    return 0


def _subsets(args: argparse.Namespace) -> int:
    import pandas as pd

    from imagegem_hf.data.subsets import make_rec_subsets, subset_statistics

    interactions = pd.read_parquet(Path(args.dataset_dir) / "interactions")
    subsets = make_rec_subsets(interactions)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in subsets.items():
        df.to_parquet(out / f"{name}.parquet", index=False)
    print(subset_statistics(subsets))
    return 0


_SCORERS = {"hpsv2": "HPSv2", "pickscore": "PickScore", "clip": "CLIPScore"}


def _pairs(args: argparse.Namespace) -> int:
    import pandas as pd

    from imagegem_hf.data.pairs import (
        image_dir_loader,
        make_preference_pairs,
        write_exchange_pairs,
        write_preference_pairs,
    )

    images = pd.read_parquet(Path(args.dataset_dir) / "images").drop_duplicates("imageId")
    if args.max_images and len(images) > args.max_images:
        images = images.sample(args.max_images, random_state=0)
    locate = None
    if args.image_dir and (Path(args.image_dir) / "fetch_manifest.json").is_file():
        from imagegem_hf.fetch.images import fetched_image_loader

        locate = fetched_image_loader(args.image_dir)  # the output of `imagegem dataset fetch-images`
    elif args.image_dir:
        locate = image_dir_loader(args.image_dir)
    scorer = None
    if args.score in (*_SCORERS, "toy") and locate is None:
        raise ValueError(
            f"--score {args.score} scores image files: pass --image-dir (or use --score reactions or a column)."
        )
    if args.score == "toy":
        from imagegem_hf.toy import ToyReward

        scorer = ToyReward()
    elif args.score in _SCORERS:
        import imagegem_hf.scoring as scoring

        scorer_class = getattr(scoring, _SCORERS[args.score])
        from imagegem_hf.distributed import local_device

        kwargs = {"device": local_device(args.device)}  # `cuda`: this process's GPU under `accelerate launch`
        scorer = (
            scorer_class.from_pretrained(args.scorer_path, **kwargs)
            if args.scorer_path
            else scorer_class.from_pretrained(**kwargs)
        )
    pairs = make_preference_pairs(
        images,
        score=args.score,
        scorer=scorer,
        locate=locate,
        pairs_per_cluster=args.pairs_per_cluster,
        min_margin=args.min_margin,
    )
    from imagegem_hf.distributed import is_main_process

    if not is_main_process():  # under `accelerate launch` every process scored its share; one writes
        return 0
    path = write_preference_pairs(pairs, args.dataset_dir)
    print(
        f"{len(pairs):,} pairs → {path}"
        + (f" (left out: {pairs.attrs['problems']})" if pairs.attrs.get("problems") else "")
    )
    if args.exchange_dir:
        if locate is None:
            raise ValueError("--exchange-dir writes image bytes: pass --image-dir.")
        target = write_exchange_pairs(pairs, locate, args.exchange_dir)
        print(f"exchange format (jpg_0, jpg_1, label_0, caption) → {target}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from imagegem_hf.hub import push_folder

    print(push_folder(args.dataset_dir, args.repo_id, repo_type="dataset", private=args.private))
    return 0
