"""Subcommands `imagegem dataset fetch-images`, `imagegem dataset crawl` and `imagegem w2w fetch-loras`.

Registered by the `dataset` and `w2w` areas; only argparse is imported here, the fetchers when a command runs.
"""

from __future__ import annotations

import argparse


def _add_fetch_arguments(parser: argparse.ArgumentParser, concurrency: int, rate: float) -> None:
    parser.add_argument("--concurrency", type=int, default=concurrency, help="Requests in flight at once.")
    parser.add_argument(
        "--rate", type=float, default=rate, help="Requests per second per host (0: unlimited; be kind to servers)."
    )
    parser.add_argument("--retries", type=int, default=4, help="Retries on 429/5xx/timeouts (honours Retry-After).")
    parser.add_argument("--timeout", type=float, default=30.0, help="Timeout of one request attempt, in seconds.")


def _fetch_config(args: argparse.Namespace):
    from imagegem_hf.fetch.client import FetchConfig

    return FetchConfig(
        concurrency=args.concurrency,
        requests_per_second=args.rate or None,
        retries=args.retries,
        timeout=args.timeout,
    )


def register_dataset_commands(commands: argparse._SubParsersAction) -> None:
    """Add `fetch-images` and `crawl` to `imagegem dataset`."""
    images = commands.add_parser(
        "fetch-images", help="Download the images of a dataset's `images` config into sharded parquet (resumable)."
    )
    images.add_argument("dataset_dir", help="A built dataset folder or a Hub dataset repo id.")
    images.add_argument("output_dir", help="Output folder (a rerun with the same arguments resumes it).")
    images.add_argument("--shard-size", type=int, default=1000, help="Images per parquet shard.")
    images.add_argument("--max-size", type=int, default=None, help="Shrink images whose longest side is larger.")
    images.add_argument("--rec-subset", default=None, help="Only the items of this subset parquet (dataset subsets).")
    images.add_argument("--pairs", action="store_true", help="Only images that appear in preference_pairs.")
    images.add_argument("--topic", default=None, help="Only images of preference_pairs with this topic.")
    images.add_argument("--limit", type=int, default=None, help="At most this many images.")
    images.add_argument(
        "--give-up-transient",
        action="store_true",
        help="Last pass: record URLs that still time out or fail with 5xx as failures and finish their shards.",
    )
    _add_fetch_arguments(images, concurrency=32, rate=20.0)
    images.set_defaults(func=_fetch_images)

    crawl = commands.add_parser("crawl", help="Crawl the Civitai API into raw pages for `imagegem dataset build`.")
    crawl.add_argument("output_dir", help="Raw dump folder (images/, models/); a rerun resumes from its cursor.")
    crawl.add_argument("--resources", default="images,models", help="Comma-separated: images, models.")
    crawl.add_argument("--base-url", default="https://civitai.com/api/v1", help="API root.")
    crawl.add_argument("--page-size", type=int, default=100, help="Items per page (`limit`).")
    crawl.add_argument("--max-pages", type=int, default=None, help="Pages per resource in this run (default: all).")
    crawl.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="Extra query parameter (repeatable)."
    )
    crawl.add_argument(
        "--api-key-env", default="CIVITAI_API_KEY", help="Environment variable with an API key (optional)."
    )
    _add_fetch_arguments(crawl, concurrency=1, rate=1.0)
    crawl.set_defaults(func=_crawl)


def register_w2w_commands(commands: argparse._SubParsersAction) -> None:
    """Add `fetch-loras` to `imagegem w2w`."""
    loras = commands.add_parser(
        "fetch-loras", help="Download verified LoRA safetensors of a dataset's `loras` config (resumable)."
    )
    loras.add_argument("dataset_dir", help="A built dataset folder or a Hub dataset repo id.")
    loras.add_argument("output_dir", help="Folder of <modelVersionId>.safetensors (input of `imagegem w2w build`).")
    loras.add_argument("--base", action="append", default=[], help="Base model to keep, e.g. SDXL (repeatable).")
    loras.add_argument("--tag", action="append", default=[], help="Tag every kept model carries (repeatable).")
    loras.add_argument("--min-rank", type=int, default=None, help="Drop files whose largest rank is below this.")
    loras.add_argument("--max-rank", type=int, default=None, help="Drop files whose largest rank is above this.")
    loras.add_argument("--limit", type=int, default=None, help="At most this many files.")
    _add_fetch_arguments(loras, concurrency=8, rate=5.0)
    loras.set_defaults(func=_fetch_loras)


def _fetch_images(args: argparse.Namespace) -> int:
    from imagegem_hf.fetch.images import fetch_images

    report = fetch_images(
        args.dataset_dir,
        args.output_dir,
        config=_fetch_config(args),
        shard_size=args.shard_size,
        max_size=args.max_size,
        rec_subset=args.rec_subset,
        pairs=args.pairs,
        topic=args.topic,
        limit=args.limit,
        give_up_transient=args.give_up_transient,
    )
    print(report.summary())
    print(f"images → {args.output_dir} (load_dataset('{args.output_dir}', split='train')); failures/ lists why.")
    return 0 if not report.shards_incomplete else 1


def _crawl(args: argparse.Namespace) -> int:
    from imagegem_hf.fetch.crawl import crawl

    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}.")
        params[key] = value
    report = crawl(
        args.output_dir,
        base_url=args.base_url,
        resources=tuple(r.strip() for r in args.resources.split(",") if r.strip()),
        page_size=args.page_size,
        max_pages=args.max_pages,
        params=params,
        api_key_env=args.api_key_env,
        config=_fetch_config(args),
    )
    print(report.summary())
    return 0 if not report.stopped else 1


def _fetch_loras(args: argparse.Namespace) -> int:
    from imagegem_hf.fetch.loras import fetch_loras

    report = fetch_loras(
        args.dataset_dir,
        args.output_dir,
        config=_fetch_config(args),
        base_models=args.base or None,
        tags=args.tag or None,
        min_rank=args.min_rank,
        max_rank=args.max_rank,
        limit=args.limit,
    )
    print(report.summary())
    print(
        f"LoRAs → {args.output_dir} (imagegem w2w build {args.output_dir} ...); manifest.jsonl maps files to models."
    )
    return 0 if not report.pending else 1
