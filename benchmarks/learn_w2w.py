"""Does a W2W edit do what it says? Measured in the toy world on user-made LoRAs fine-tuned from the toy base.

64 toy users each get a LoRA (kohya files, ranks 1–16) in their own colour grade along two attributes measured from
pixels (R − B and the green level of the background), warmth and brightness, which are correlated across users. The
LoRAs are labelled by the measured attributes of their own samples, a `WeightSpace` is built over 52 of them, a
warmth direction is learnt and debiased against the brightness direction, and the 12 held-out LoRAs are edited at 9
strengths, with the same prompts and seeds at every strength. Targets:

- the edited attribute moves monotonically with α along the learnt direction: Spearman ≥ 0.9 over the strengths
  (baseline: a direction learnt from shuffled labels, the control that must fail);
- after `debias`, the other attribute's change per unit α shrinks ≥ 5× compared with the raw direction, while the
  debiased direction still edits warmth monotonically (Spearman ≥ 0.9).

    python benchmarks/learn_w2w.py [--small] [--base TOY_PIPELINE] [--output-dir bench_output/learn_w2w]
        [--population SEED] [--attribute warmth|brightness] [--align-signs] [--in-subspace]

The LoRAs are trained once and cached (`imagegem_hf.toy.loras.default_cache_dir()`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from imagegem_hf.toy import load_toy_pipeline
from imagegem_hf.toy.loras import STYLE_ATTRIBUTES
from imagegem_hf.toy.w2w_edits import W2WToyConfig, plot_attribute_vs_strength, run_w2w_effect, small_config


def result(name: str, ours: float, baseline: float, ratio: float, target: str, passed: bool) -> str:
    return f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} ratio={ratio:.4g} target={target} " + (
        "PASS" if passed else "FAIL"
    )


def report(effect, config: W2WToyConfig) -> list[str]:
    """The benchmark's RESULT lines for a `W2WToyEffect`."""
    attribute, other = config.attribute, config.other
    rho, rho_control = effect.spearman("raw", attribute), effect.spearman("shuffled", attribute)
    rho_debiased = effect.spearman("debiased", attribute)
    slope_raw, slope_debiased = abs(effect.slope("raw", other)), abs(effect.slope("debiased", other))
    shrink = slope_raw / max(slope_debiased, 1e-12)
    return [
        result(
            f"w2w_toy_{attribute}_spearman", rho, rho_control, rho / max(abs(rho_control), 1e-3), ">=0.9", rho >= 0.9
        ),
        result(
            f"w2w_toy_debias_{other}_per_alpha",
            slope_debiased,
            slope_raw,
            shrink,
            ">=5x_smaller",
            shrink >= 5.0,
        ),
        result(
            f"w2w_toy_debiased_{attribute}_spearman",
            rho_debiased,
            rho,
            rho_debiased / max(abs(rho), 1e-3),
            ">=0.9",
            rho_debiased >= 0.9,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="bench_output/learn_w2w", help="Where the figure and numbers go.")
    parser.add_argument("--cache-dir", default=None, help="Folder of the user LoRAs (default: the toy cache).")
    parser.add_argument("--small", action="store_true", help="The smaller size of the slow test (40 LoRAs).")
    parser.add_argument("--base", default=None, help="Toy pipeline folder (default: the shipped toy base).")
    parser.add_argument(
        "--attribute", choices=STYLE_ATTRIBUTES, default=None, help="The attribute edited (the other is kept)."
    )
    parser.add_argument("--align-signs", action="store_true", help="Signs fixed by the population (align_signs).")
    parser.add_argument("--in-subspace", action="store_true", help="Edit the LoRAs' PCA reconstructions.")
    parser.add_argument("--population", type=int, default=0, help="Seed of the user population (ToyLoRAConfig).")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # several threads on a shared 2-core machine spin against each other
    config = small_config() if args.small else W2WToyConfig()
    config.align_signs, config.in_subspace, config.loras.seed = args.align_signs, args.in_subspace, args.population
    if args.attribute is not None:
        config.attribute, config.other = args.attribute, next(a for a in STYLE_ATTRIBUTES if a != args.attribute)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    start, cpu = time.time(), time.process_time()
    effect = run_w2w_effect(load_toy_pipeline(args.base), args.cache_dir, config)
    figure = plot_attribute_vs_strength(effect, config.attribute, config.other, output / "w2w_attribute_vs_alpha.png")
    accuracies = {k: d.accuracy for k, d in effect.directions.items()}
    print(f"strengths α: {[round(float(a), 3) for a in effect.strengths]}")
    for key, curves in effect.curves.items():
        print(f"{key:>9}: " + "; ".join(f"{n} {[round(float(v), 3) for v in c]}" for n, c in curves.items()))
    print(f"held-out classifier accuracy: {accuracies}; figure → {figure}")
    print(
        f"{config.other} per unit α over |α| ≤ half the span: "
        + ", ".join(f"{k} {effect.slope(k, config.other, span=0.5):+.5f}" for k in ("raw", "debiased"))
    )
    print(f"wall {time.time() - start:.0f} s, CPU {time.process_time() - cpu:.0f} s")
    lines = report(effect, config)
    summary = {"config": asdict(config), "strengths": effect.strengths.tolist(), "accuracy": accuracies}
    summary["curves"] = {k: {n: v.tolist() for n, v in c.items()} for k, c in effect.curves.items()}
    (output / "learn_w2w.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(lines))
    return 0 if all(line.endswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
