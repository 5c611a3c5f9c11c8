"""W2W benchmarks on SDXL-shaped LoRAs (ours vs a baseline, same process, same data).

1. `rank1_reduce` (r×r Gram matrices of the factors, a Cholesky root, the top eigenpair of an r×r core) vs a
   dense SVD of ΔW = (α/r)·up·down, rank-32 LoRAs over a 640-wide and a 1280-wide SDXL transformer block
   (attention, cross-attention and feed-forward layers).
   Target: ≥ 50× faster.
2. LoRAs/s of the full path (read kohya fp16 files with SDXL SGM names → rank-1 reduce → stream into a
   `WeightSpace` build, header scan and PCA included) vs only reading the same files with safetensors (every
   tensor loaded), both with CPUs + 1 worker processes (the CLI default) and from disk (the files are dropped
   from the page cache first: a corpus of thousands of SDXL LoRAs is terabytes and is never cached), over 48
   rank-32 files (3.8 GB). The two run back to back in 6 repeats, order alternated; the median of the per-repeat
   ratios is reported. Target: within 2× of the read floor. The 1-process and page-cache-warm figures are
   printed too. With `--compare-tree PATH` (another checkout of the repository, e.g. `git worktree add PATH
   <commit>`), the same build is also timed in child processes importing that checkout's `imagegem_hf`,
   alternating with this one, on the same files from disk: the before/after cost of a change to the build
   (target: at most 10% slower).
3. Peak memory (RSS of a child process) of building a space over ≥ 2,000 SDXL-shaped rank-1 vectors of the full
   SDXL UNet attention/feed-forward layout, generated reproducibly from seeds, vs the N × d × 4 bytes a dense data
   matrix would take. Target: < 8 GB.

    python benchmarks/bench_w2w.py            # all three (about 10 minutes on one busy core)
    python benchmarks/bench_w2w.py --quick    # smaller sizes, same code paths
    python benchmarks/bench_w2w.py --only throughput --compare-tree ../old-checkout

Everything runs with `--threads` BLAS/torch threads (default 1): on a shared, oversubscribed machine, multi-threaded
small linear algebra spends most of its time waiting at thread barriers, which would distort both sides.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from imagegem_hf.w2w import LoRA, LoRAModule, WeightSpace, rank1_reduce
from imagegem_hf.w2w.vectorize import WorkerPool

CONTEXT = 2048  # SDXL cross-attention width
# (diffusers prefix, SGM prefix, width, transformer blocks) for every SDXL transformer.
SDXL_TRANSFORMERS = (
    [(f"down_blocks.1.attentions.{a}", f"input_blocks_{4 + a}_1", 640, 2) for a in range(2)]
    + [(f"down_blocks.2.attentions.{a}", f"input_blocks_{7 + a}_1", 1280, 10) for a in range(2)]
    + [("mid_block.attentions.0", "middle_block_1", 1280, 10)]
    + [(f"up_blocks.0.attentions.{a}", f"output_blocks_{a}_1", 1280, 10) for a in range(3)]
    + [(f"up_blocks.1.attentions.{a}", f"output_blocks_{3 + a}_1", 640, 2) for a in range(3)]
)


def block_layers(width: int) -> dict[str, tuple[int, int]]:
    """`{layer: (out, in)}` of one SDXL transformer block of `width` channels."""
    return {
        "attn1.to_q": (width, width),
        "attn1.to_k": (width, width),
        "attn1.to_v": (width, width),
        "attn1.to_out.0": (width, width),
        "attn2.to_q": (width, width),
        "attn2.to_k": (width, CONTEXT),
        "attn2.to_v": (width, CONTEXT),
        "attn2.to_out.0": (width, width),
        "ff.net.0.proj": (8 * width, width),
        "ff.net.2": (width, 4 * width),
    }


def sdxl_layout(transformers=SDXL_TRANSFORMERS, max_blocks: int | None = None) -> dict[str, tuple]:
    """`{diffusers name: (out, in, (), sgm kohya name)}` for the attention/ff layers of the given transformers."""
    layout = {}
    for prefix, sgm, width, blocks in transformers:
        layout[f"unet.{prefix}.proj_in"] = (width, width, (), f"lora_unet_{sgm}_proj_in")
        layout[f"unet.{prefix}.proj_out"] = (width, width, (), f"lora_unet_{sgm}_proj_out")
        for b in range(blocks if max_blocks is None else min(blocks, max_blocks)):
            for layer, (n_out, n_in) in block_layers(width).items():
                kohya = f"lora_unet_{sgm}_transformer_blocks_{b}_{layer.replace('.', '_')}"
                layout[f"unet.{prefix}.transformer_blocks.{b}.{layer}"] = (n_out, n_in, (), kohya)
    return layout


def random_lora(layout: dict, rank: int, seed: int) -> LoRA:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (n_out, n_in, _, _) in layout.items():
        down = torch.randn(rank, n_in, generator=generator) / n_in**0.5
        up = torch.randn(n_out, rank, generator=generator) / rank**0.5
        modules[name] = LoRAModule(down=down, up=up, alpha=rank / 2)
    return LoRA(modules)


def result_line(name: str, ours: float, baseline: float, ratio: float, target: str, passed: bool) -> str:
    return f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} ratio={ratio:.4g} target={target} " + (
        "PASS" if passed else "FAIL"
    )


def bench_reduce(n_loras: int, rank: int = 32) -> str:
    layout = sdxl_layout([SDXL_TRANSFORMERS[0], SDXL_TRANSFORMERS[2]], max_blocks=1)  # one 640 + one 1280 block
    loras = [random_lora(layout, rank, seed) for seed in range(n_loras)]
    rank1_reduce(loras[0])  # warm-up
    start = time.perf_counter()
    reduced = [rank1_reduce(lora) for lora in loras]
    ours = (time.perf_counter() - start) / n_loras

    start = time.perf_counter()
    max_error = 0.0
    for lora, ours_lora in zip(loras, reduced, strict=True):
        for name, module in lora.modules.items():
            delta = module.delta_weight()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            top = s[0] * torch.outer(u[:, 0], vh[0])
            mine = ours_lora.modules[name]
            max_error = max(max_error, float((torch.outer(mine.up[:, 0], mine.down[0]) - top).abs().max()))
    baseline = (time.perf_counter() - start) / n_loras
    print(
        f"[reduce] {len(layout)} SDXL layers, rank {rank}: factored {ours * 1e3:.1f} ms/LoRA, dense SVD "
        f"{baseline * 1e3:.0f} ms/LoRA, max |ΔW₁ difference| {max_error:.2e}"
    )
    if max_error > 1e-4:
        raise AssertionError(f"factored and dense top-1 components differ by {max_error}")
    ratio = baseline / ours
    return result_line("rank1_reduce_vs_dense_svd_speedup", ours, baseline, ratio, ">=50", ratio >= 50)


def read_file(path: Path) -> None:
    """Load every tensor of a safetensors file (the read floor's unit of work)."""
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key)


def write_loras(n_files: int, folder: Path, rank: int) -> None:
    """Write `n_files` kohya fp16 SDXL LoRA files (run in a child process, see `bench_throughput`)."""
    layout = sdxl_layout(SDXL_TRANSFORMERS[:5])
    for seed in range(n_files):
        lora = random_lora(layout, rank, seed)
        tensors = {}
        for name, module in lora.modules.items():
            kohya = layout[name][3]
            tensors[f"{kohya}.lora_down.weight"] = module.down.half()
            tensors[f"{kohya}.lora_up.weight"] = module.up.half()
            tensors[f"{kohya}.alpha"] = torch.tensor(float(module.alpha))
        save_file(tensors, str(folder / f"sdxl_lora_{seed:03d}.safetensors"))


def build_child(folder: Path, workers: int) -> None:
    """Time one `WeightSpace.build` over the benchmark's files in `folder` and print `{"seconds", "module"}` (run by
    `--compare-tree` in a child process, with the checkout under test on `PYTHONPATH`)."""
    files = sorted(folder.glob("sdxl_lora_*.safetensors"))
    options = {"show_progress": False} if "show_progress" in inspect.signature(WeightSpace.build).parameters else {}
    with tempfile.TemporaryDirectory(dir=folder, prefix="build-") as cache:
        start = time.perf_counter()
        WeightSpace.build(
            files, n_components=len(files) - 1, base="sdxl", cache_dir=cache, num_workers=workers, **options
        )
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "module": inspect.getfile(WeightSpace)}))


def compare_trees(folder: Path, tree: Path, workers: int, repeats: int, evict) -> str:
    """Build times of this checkout vs `tree` on the same files from disk, in fresh child processes, alternating
    which goes first; the median of the per-repeat time ratios is reported."""
    trees = {"ours": Path(__file__).resolve().parents[1], "baseline": tree.resolve()}
    times: dict[str, list[float]] = {name: [] for name in trees}
    for repeat in range(repeats):
        for name in list(trees) if repeat % 2 == 0 else list(trees)[::-1]:
            evict()
            env = {**os.environ, "PYTHONPATH": str(trees[name]), "OMP_NUM_THREADS": "1"}
            command = [sys.executable, __file__, "--build-child", str(workers), "--cache-dir", str(folder)]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            child = json.loads(out.strip().splitlines()[-1])
            if not Path(child["module"]).resolve().is_relative_to(trees[name]):
                raise RuntimeError(f"the {name} child imported {child['module']}, not the checkout {trees[name]}")
            times[name].append(child["seconds"])
    ratios = [ours / base for ours, base in zip(times["ours"], times["baseline"], strict=True)]
    n_files = len(list(folder.glob("sdxl_lora_*.safetensors")))
    print(
        f"[throughput] this checkout vs {tree}: build {', '.join(f'{t:.2f}' for t in times['ours'])} s vs "
        f"{', '.join(f'{t:.2f}' for t in times['baseline'])} s; time ratio per repeat "
        f"{', '.join(f'{r:.3f}' for r in ratios)}"
    )
    ratio = statistics.median(ratios)
    ours, base = (n_files / statistics.median(times[name]) for name in ("ours", "baseline"))
    return result_line("build_vs_compare_tree_time_ratio", ours, base, ratio, "<=1.10", ratio <= 1.10)


def bench_throughput(
    n_files: int, folder: Path, rank: int = 32, repeats: int = 6, compare_tree: Path | None = None
) -> str:
    workers = (os.cpu_count() or 1) + 1  # the CLI's default: one more than the CPUs, one waits on the disk
    layout = sdxl_layout(SDXL_TRANSFORMERS[:5])  # down_blocks.1, down_blocks.2, mid_block: 386 layers
    # The files are generated in a child process: gigabytes of generator garbage in this process would slow down
    # every worker forked from it, which is an artefact of the benchmark, not of the code measured.
    subprocess.run([sys.executable, __file__, "--write-loras", str(n_files), "--cache-dir", str(folder)], check=True)
    files = sorted(folder.glob("sdxl_lora_*.safetensors"))
    size_mb = sum(p.stat().st_size for p in files) / n_files / 2**20
    os.sync()  # no writeback of the generated files during the timings

    def read(processes: int):
        def run() -> None:
            with WorkerPool(processes) as pool:
                for _ in pool.map(read_file, files):
                    pass

        return run

    def evict() -> None:
        """Drop the files from the page cache: a corpus of thousands of SDXL LoRAs (terabytes) is read from disk."""
        os.sync()
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    def timed(function) -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    def build(processes: int):
        return lambda: WeightSpace.build(
            files, n_components=n_files - 1, base="sdxl", cache_dir=folder, num_workers=processes, show_progress=False
        )

    read(1)()
    warm_read, warm_ours = timed(read(workers)), timed(build(workers))
    ratios, cold_reads, cold_builds = [], [], []
    # Back to back, alternating which goes first (on this kind of VM a run is slower right after the other kind
    # dropped its memory), an even number of repeats; the median ratio is reported.
    for repeat in range(repeats):
        runs = [(cold_reads, read(workers)), (cold_builds, build(workers))]
        for sink, function in runs if repeat % 2 == 0 else runs[::-1]:
            evict()
            sink.append(timed(function))
        ratios.append(cold_builds[-1] / cold_reads[-1])
    evict()
    cold_read_serial = timed(read(1))
    evict()
    cold_serial = timed(build(1))
    space = build(workers)()
    assert space.config.module_names == sorted(layout) and space.config.base == "sdxl"
    cold_read, cold_ours = statistics.median(cold_reads), statistics.median(cold_builds)
    print(
        f"[throughput] {n_files} kohya fp16 rank-{rank} SDXL LoRAs ({len(layout)} layers, {size_mb:.0f} MB each), "
        f"LoRAs/s (median of {repeats} interleaved repeats), {workers} processes on {os.cpu_count()} CPUs:\n"
        f"  from disk (page cache dropped): read with safetensors {n_files / cold_read:.1f} "
        f"({n_files / cold_read_serial:.1f} with 1 process), read + reduce + stream + PCA {n_files / cold_ours:.1f} "
        f"({n_files / cold_serial:.1f} with 1 process)\n"
        f"  per repeat: read {', '.join(f'{t:.2f}' for t in cold_reads)} s; build "
        f"{', '.join(f'{t:.2f}' for t in cold_builds)} s; slowdown {', '.join(f'{r:.2f}' for r in ratios)}\n"
        f"  page cache warm: read only {n_files / warm_read:.1f}, full path {n_files / warm_ours:.1f}"
    )
    ratio = statistics.median(ratios)
    line = result_line(
        "reduce_stream_vs_read_floor_slowdown", n_files / cold_ours, n_files / cold_read, ratio, "<=2", ratio <= 2
    )
    if compare_tree is not None:
        line += "\n" + compare_trees(folder, compare_tree, workers, 2 * repeats, evict)
    return line


class SeededVectors:
    """N rank-1 SDXL vectors, each generated on demand from its index (a mixture of a few seeded pool vectors
    and a seeded shift of another), so the full N × d matrix never exists."""

    def __init__(self, n: int, dim: int, seed: int = 0, pool: int = 6) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.dim = n, dim
        self.pool = rng.standard_normal((pool, dim), dtype=np.float32) * 0.01

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng(1000 + i)
        a, b = rng.choice(len(self.pool), size=2, replace=False)
        vector = rng.standard_normal() * self.pool[a] + rng.standard_normal() * self.pool[b]
        vector += 0.3 * np.roll(self.pool[(a + b) % len(self.pool)], int(rng.integers(self.dim)))
        return vector


def memory_child(n: int, components: int, cache_dir: str) -> None:
    import resource

    layout = {k: v[:3] for k, v in sdxl_layout().items()}
    dim = sum(o + i for o, i, _ in layout.values())
    start = time.perf_counter()
    space = WeightSpace.build(
        SeededVectors(n, dim),
        n_components=components,
        modules=layout,
        cache_dir=cache_dir,
        cache_dtype="float16",
        show_progress=False,
    )
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(
        json.dumps(
            {
                "n": n,
                "dim": dim,
                "modules": len(layout),
                "peak_bytes": peak,
                "seconds": elapsed,
                "top_variance": float(space.explained_variance[0]),
            }
        )
    )


def bench_memory(n: int, components: int, folder: Path, threads: int) -> str:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            str(n),
            "--components",
            str(components),
            "--cache-dir",
            str(folder),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)},
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    peak_gb, dense_gb = info["peak_bytes"] / 1e9, info["n"] * info["dim"] * 4 / 1e9
    print(
        f"[memory] space over N = {info['n']} SDXL-shaped LoRAs ({info['modules']} layers, d = {info['dim']:,}), "
        f"m = {components}: peak RSS {peak_gb:.2f} GB in {info['seconds']:.0f} s; dense N×d×4 = {dense_gb:.1f} GB"
    )
    return result_line("space_build_peak_rss_gb", peak_gb, dense_gb, peak_gb / dense_gb, "<8GB", peak_gb < 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smaller sizes (same code paths).")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-loras", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--components", type=int, default=32, help="Components of the memory benchmark's space.")
    parser.add_argument("--cache-dir", default=None, help="Where temporary files go (needs ~N·d·2 bytes).")
    parser.add_argument("--threads", type=int, default=1, help="BLAS / torch threads for ours and the baselines.")
    parser.add_argument("--only", default="reduce,throughput,memory", help="Comma-separated subset to run.")
    parser.add_argument(
        "--compare-tree",
        type=Path,
        default=None,
        help="Another checkout of this repository: also time the throughput build with its imagegem_hf.",
    )
    parser.add_argument("--build-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads)
    if args.write_loras is not None:
        write_loras(args.write_loras, Path(args.cache_dir), rank=32)
        return
    if args.build_child is not None:
        build_child(Path(args.cache_dir), args.build_child)
        return
    if args.memory_child is not None:
        memory_child(args.memory_child, args.components, args.cache_dir)
        return
    with tempfile.TemporaryDirectory(dir=args.cache_dir, prefix="bench_w2w-") as tmp:
        only, lines = args.only.split(","), []
        if "reduce" in only:
            lines.append(bench_reduce(n_loras=1 if args.quick else 3))
        if "throughput" in only:
            n_files = 6 if args.quick else 48
            lines.append(bench_throughput(n_files=n_files, folder=Path(tmp), compare_tree=args.compare_tree))
        if "memory" in only:
            n = 200 if args.quick else 2000
            lines.append(bench_memory(n=n, components=args.components, folder=Path(tmp), threads=args.threads))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
