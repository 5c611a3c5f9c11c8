"""`imagegem demo`: the whole loop on the bundled, seeded, Civitai-shaped sample.

Stages run in order; each one lives next to the code it shows (`<area>/demo.py: run_demo(context)`) and
returns summary lines (what was produced, where). Later stages read what earlier ones wrote (the built
dataset, the recommendation subsets) from `context`. The summary ends with a table of the saved artifacts, each
loaded with its plain Hugging Face call in a fresh process (`imagegem_hf.artifacts`).
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegem_hf.artifacts import ArtifactLoadError, artifact_table, check_artifacts, demo_artifacts

# (stage name, module with `run_demo(context) -> list[str]`)
STAGES: tuple[tuple[str, str], ...] = (
    ("data", "imagegem_hf.data.demo"),
    ("recsys", "imagegem_hf.recsys.demo"),
    ("ranker", "imagegem_hf.ranker.demo"),
    ("dpo", "imagegem_hf.dpo.demo"),
    ("w2w", "imagegem_hf.w2w.demo"),
    ("preference", "imagegem_hf.preference.demo"),
)


@dataclass
class DemoContext:
    """What the demo stages share.

    Attributes:
        output_dir: Root of everything the demo writes (`demo_output/`).
        seed: Seed of the sample and of every model.
        users: Number of users in the synthetic sample.
        artifacts: Paths and objects that a stage leaves for later ones (e.g. `"dataset_dir"`).
    """

    output_dir: Path
    seed: int = 0
    users: int = 2000
    artifacts: dict[str, Any] = field(default_factory=dict)

    def stage_dir(self, name: str) -> Path:
        path = self.output_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (a stage's cost on a shared machine)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_demo(output_dir: str | Path = "demo_output", seed: int = 0, users: int = 2000, only: list[str] | None = None):
    """Run the demo stages and return `{stage: summary lines}`.

    Args:
        output_dir: Where tables, figures and artifacts go.
        seed: Seed for the sample and the models.
        users: Users in the synthetic sample (≈25 images each).
        only: Run only these stages (the `data` stage always runs, the others read its output).

    Raises:
        ArtifactLoadError: When a saved artifact does not load with its plain Hugging Face call in a fresh process
            (after every stage has run and `artifacts.md` is written).

    Example:
        ```python
        >>> from imagegem_hf.demo import run_demo
        >>> summary = run_demo("demo_output", only=["data"])  # doctest: +SKIP
        ```
    """
    names = [name for name, _ in STAGES]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"Unknown demo stage(s) {unknown}; choose from {names}.")
    context = DemoContext(output_dir=Path(output_dir), seed=seed, users=users)
    context.output_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, list[str]] = {}
    for name, module in STAGES:
        if only and name != "data" and name not in only:
            continue
        print(f"\n=== demo stage: {name} ===", flush=True)
        start, cpu = time.perf_counter(), _cpu_seconds()
        summary[name] = importlib.import_module(module).run_demo(context)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        print(f"--- {name} done in {wall:.1f}s ({cpu:.1f} CPU s, this process and its children)", flush=True)
    print("\n=== demo summary ===")
    for name, lines in summary.items():
        print(f"[{name}]")
        for line in lines:
            print(f"  {line}")
    checks = check_artifacts(demo_artifacts(context.output_dir, stages=list(summary)))
    table = artifact_table(checks)
    (context.output_dir / "artifacts.md").write_text(table + "\n", encoding="utf-8")
    print("\n=== artifacts, loaded with the plain Hugging Face libraries in fresh processes without imagegem_hf ===")
    print(table)
    if not all(check.result.ok for check in checks):
        raise ArtifactLoadError(checks)
    return summary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="Run the whole loop on the bundled sample (writes demo_output/).")
    parser.add_argument("--output-dir", default="demo_output", help="Where to write tables, figures and artifacts.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample and every model.")
    parser.add_argument("--users", type=int, default=2000, help="Users in the synthetic sample.")
    parser.add_argument(
        "--only", default=None, help=f"Comma-separated stages to run ({', '.join(n for n, _ in STAGES)})."
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        run_demo(args.output_dir, seed=args.seed, users=args.users, only=args.only.split(",") if args.only else None)
    except ArtifactLoadError as err:
        print(f"imagegem demo: error: {err} (table: {Path(args.output_dir) / 'artifacts.md'})", file=sys.stderr)
        return 1
    return 0
