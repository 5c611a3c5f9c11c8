"""Does the weight space read the toy users' styles linearly? ImageGem's per-LoRA sign rule vs aligned signs.

Each toy user's LoRA (`imagegem_hf.toy.loras`, 64 users, ranks 1–16) is graded in a known style (warmth,
brightness). A `WeightSpace` is built over three quarters of the LoRAs, the others are projected into it, and a
least-squares fit of each true style on the 12 coefficients of the training LoRAs predicts the held-out ones
(4 folds, R² pooled over them). The baseline is the reduction's sign rule (largest entry of `up` positive, per LoRA);
ours fixes the signs by the population (`WeightSpace.build(align_signs=True)`). Target: a higher held-out R² for
both styles on every population.

    python benchmarks/learn_w2w_signs.py [--populations 0 1 2] [--components 12]

The LoRAs are trained once per population and cached (`imagegem_hf.toy.loras.default_cache_dir()`, about 4 minutes
each on 2 cores); the measurement itself takes seconds.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from imagegem_hf.toy import load_toy_pipeline
from imagegem_hf.toy.loras import STYLE_ATTRIBUTES, ToyLoRAConfig, user_lora_collection
from imagegem_hf.toy.w2w_edits import held_out_style_r2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[0, 1, 2], help="ToyLoRAConfig seeds.")
    parser.add_argument("--n-loras", type=int, default=64, help="LoRAs per population.")
    parser.add_argument("--components", type=int, default=12, help="Principal components of the spaces.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_toy_pipeline()
    lines = []
    for population in args.populations:
        collection = user_lora_collection(pipe, None, ToyLoRAConfig(n_loras=args.n_loras, seed=population))
        styles = np.array([[getattr(s, name) for name in STYLE_ATTRIBUTES] for s in collection.styles])
        rule = held_out_style_r2(collection.files, styles, args.components, align_signs=False)
        aligned = held_out_style_r2(collection.files, styles, args.components, align_signs=True)
        for name in STYLE_ATTRIBUTES:
            ours, baseline = aligned[name], rule[name]
            verdict = "PASS" if ours > baseline else "FAIL"
            lines.append(
                f"RESULT w2w_signs_{name}_held_out_r2_population_{population} ours={ours:.4g} baseline={baseline:.4g} "
                f"ratio={ours / baseline if baseline > 0 else float('inf'):.4g} target=>baseline {verdict}"
            )
    print("\n".join(lines))
    return 0 if all(line.endswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
