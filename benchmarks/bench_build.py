"""Dataset build throughput and memory: 100K vs 1M raw image records, end to end, each in its own process.

Targets (issue: foundation): ≥ 20,000 records/s end to end on 2 cores, and peak RSS of the 1M build within 1.5×
of the 100K build (memory independent of input size). Run: `python benchmarks/bench_build.py [--sizes 100000,1000000]`.

`--page-mb 76` also builds from one `.json` page of that size, parsed item by item (ours) and, as the baseline, as
one document (`STREAM_BYTES` above the page size, how every page was read before). The memory a page costs is the
peak RSS above that of a build from a 1 MB page (the libraries' own memory); target: streamed ≤ 0.25× of whole.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

TARGET_RATE = 20_000.0
TARGET_RSS_RATIO = 1.5
TARGET_PAGE_RSS_RATIO = 0.25


def write_raw_dump(folder: Path, n_images: int, seed: int = 0, page_size: int = 1000) -> None:
    """A reproducible Civitai-shaped dump: `n_images` image records in gzip JSONL pages and 2,000 models."""
    rng = np.random.default_rng(seed)
    words = ["masterpiece", "car", "dog", "forest", "city", "portrait", "anime", "sunset", "robot", "flowers"]
    (folder / "images").mkdir(parents=True)
    (folder / "models").mkdir(parents=True)
    users = rng.integers(0, max(n_images // 50, 1), n_images)
    versions = rng.zipf(1.5, n_images) % 2000 + 100_000
    likes = (rng.pareto(1.5, n_images) * 3).astype(int)
    prompt_ids = rng.integers(0, len(words), (n_images, 6))
    for start in range(0, n_images, page_size * 50):
        with gzip.open(folder / "images" / f"part_{start // (page_size * 50):05d}.jsonl.gz", "wb", 1) as out:
            for page_start in range(start, min(start + page_size * 50, n_images), page_size):
                items = []
                for i in range(page_start, min(page_start + page_size, n_images)):
                    items.append(
                        {
                            "id": 10_000_000 + i,
                            "url": f"https://image.civitai.com/x/{i}.jpeg",
                            "hash": "U5Q0]~00",
                            "width": 512,
                            "height": 768,
                            "nsfwLevel": "None",
                            "nsfw": False,
                            "type": "image",
                            "createdAt": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T10:00:00.000Z",
                            "postId": i // 3,
                            "username": f"user{users[i]}",
                            "modelVersionIds": [int(versions[i])],
                            "stats": {
                                "likeCount": int(likes[i]),
                                "heartCount": int(likes[i] // 3),
                                "cryCount": 0,
                                "laughCount": 0,
                                "dislikeCount": 0,
                                "commentCount": 0,
                            },
                            "meta": {
                                "prompt": " ".join(words[j] for j in prompt_ids[i]) + f" {i % 50_000}",
                                "negativePrompt": "lowres",
                                "seed": i,
                                "steps": 30,
                                "sampler": "Euler a",
                                "cfgScale": 7.0,
                                "Clip skip": 2,
                            },
                        }
                    )
                out.write(orjson.dumps({"items": items, "metadata": {"nextCursor": None}}) + b"\n")
    models = [
        {
            "id": 1000 + m,
            "name": f"m{m}",
            "type": "LORA",
            "creator": {"username": f"user{m}"},
            "tags": ["x"],
            "modelVersions": [{"id": 100_000 + m, "baseModel": "SD 1.5", "files": [{"id": m, "primary": True}]}],
        }
        for m in range(2000)
    ]
    (folder / "models" / "page.json").write_bytes(orjson.dumps({"items": models}))


def write_one_page(folder: Path, megabytes: float) -> int:
    """One `images/page.json` API page of about `megabytes` MB (the records of `write_raw_dump`), and its models."""
    write_raw_dump(folder, 2000, page_size=2000)
    (folder / "images" / "part_00000.jsonl.gz").unlink()
    rng = np.random.default_rng(1)
    items, size, i = [], 0, 0
    while size < megabytes * 1e6:
        record = {
            "id": 20_000_000 + i,
            "url": f"https://image.civitai.com/x/{i}.jpeg",
            "width": 512,
            "height": 768,
            "nsfwLevel": "None",
            "createdAt": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T10:00:00.000Z",
            "username": f"user{int(rng.integers(0, 5000))}",
            "modelVersionIds": [100_000 + i % 2000],
            "stats": {"likeCount": i % 17, "heartCount": i % 5},
            "meta": {"prompt": f"masterpiece, a photo of thing {i}, " + "detailed " * 40, "seed": i, "steps": 30},
        }
        size += len(orjson.dumps(record)) + 1
        items.append(record)
        i += 1
    (folder / "images" / "page.json").write_bytes(orjson.dumps({"items": items, "metadata": {"nextCursor": None}}))
    return len(items)


def _child(raw: str, out: str, stream_bytes: str | None = None) -> None:
    import imagegem_hf.data.build as build
    from imagegem_hf.data.build import build_dataset

    if stream_bytes is not None:
        build.STREAM_BYTES = int(stream_bytes)

    start = time.perf_counter()
    report = build_dataset(raw, out, show_progress=False)
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": peak_mb, "images": report.raw["images"]}))


def measure(n_images: int, workdir: Path) -> dict:
    raw, out = workdir / f"raw_{n_images}", workdir / f"ds_{n_images}"
    t0 = time.perf_counter()
    write_raw_dump(raw, n_images)
    print(f"generated {n_images:,} raw records in {time.perf_counter() - t0:.1f}s", flush=True)
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(raw), str(out)], check=True, capture_output=True, text=True
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    stats["rate"] = n_images / stats["seconds"]
    shutil.rmtree(raw)
    shutil.rmtree(out)
    print(
        f"{n_images:>9,} records: {stats['seconds']:.1f}s, {stats['rate']:,.0f} records/s, "
        f"peak RSS {stats['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return stats


def measure_page(megabytes: float) -> None:
    """Peak RSS of builds from one page of `megabytes` MB, streamed and whole, above that of a 1 MB page."""
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = (("1 MB page", 1.0, False), ("streamed", megabytes, False), ("whole", megabytes, True))
        for name, page_mb, stream in runs:
            raw = Path(tmp) / f"raw_{page_mb}"
            if not raw.exists():
                n = write_one_page(raw, page_mb)
            size = (raw / "images" / "page.json").stat().st_size
            argv = [sys.executable, __file__, "--child", str(raw), str(Path(tmp) / name.replace(" ", "_"))]
            result = subprocess.run(argv + ([str(size + 1)] if stream else []), check=True, capture_output=True)
            peaks[name] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            print(f"{name}: {size / 1e6:.0f} MB, {n:,} records, peak RSS {peaks[name]:.0f} MB", flush=True)
    ours, baseline = peaks["streamed"] - peaks["1 MB page"], peaks["whole"] - peaks["1 MB page"]
    ratio = ours / baseline
    print(
        f"RESULT page_peak_rss_above_1MB_page ours={ours:.0f}MB baseline={baseline:.0f}MB ratio={ratio:.2f} "
        f"target={TARGET_PAGE_RSS_RATIO} {'PASS' if ratio <= TARGET_PAGE_RSS_RATIO else 'FAIL'}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000", help="Small,large record counts.")
    parser.add_argument("--page-mb", type=float, default=None, help="Also measure one page of this size (MB).")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    if args.page_mb:
        measure_page(args.page_mb)
    small_n, large_n = (int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        small, large = measure(small_n, Path(tmp)), measure(large_n, Path(tmp))
    rss_ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    for name, stats in (("build_rate_small", small), ("build_rate_large", large)):
        ratio = stats["rate"] / TARGET_RATE
        print(
            f"RESULT {name} ours={stats['rate']:.0f}rec/s baseline={TARGET_RATE:.0f}rec/s ratio={ratio:.2f} "
            f"target=1.00 {'PASS' if ratio >= 1 else 'FAIL'}"
        )
    print(
        f"RESULT build_peak_rss ours={large['peak_rss_mb']:.0f}MB baseline={small['peak_rss_mb']:.0f}MB "
        f"ratio={rss_ratio:.2f} target={TARGET_RSS_RATIO} {'PASS' if rss_ratio <= TARGET_RSS_RATIO else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
