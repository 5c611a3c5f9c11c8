"""Does PreferencePrototypeModel learn to read a user's references? Synthetic users whose taste is in their references.

Users like a signed mix of four independent attributes (colour, shape, background brightness, texture) and come in
mirrored couples, so no global score beats chance; the toy VLM is pre-trained on interleaved captions and few-shot
naming of the same kind of images (never on preferences), then trained with both stages of paper 003. Every target is
measured on users never seen in training, beside the global scores, the reference-comparison rule on the true
attributes, and the same model with each reference pair's liked and disliked image swapped.

    python benchmarks/learn_preference.py            # full size
    python benchmarks/learn_preference.py --small    # 256 training users, a quicker look

Prints the learning table and `RESULT name ours=... baseline=... ratio=... target=... PASS|FAIL` lines.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import dataclass, replace

from imagegem_hf.preference.learning import (
    LearningConfig,
    benchmark_users,
    run_learning_experiment,
    small_learning_config,
)


@dataclass
class Result:
    name: str
    ours: float
    baseline: float
    target: str
    passed: bool

    def __str__(self) -> str:
        ratio = self.ours / self.baseline if self.baseline else float("nan")
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"RESULT {self.name} ours={self.ours:.4f} baseline={self.baseline:.4f} ratio={ratio:.3f} "
            f"target={self.target} {verdict}"
        )


def results_from(table) -> list[Result]:
    """The benchmark's targets, read from the learning table."""
    unseen, seen, one_vs_three, swapped = (
        "pairwise unseen",
        "pairwise seen",
        "1v3 top-1",
        "pairwise unseen, references swapped",
    )
    model = table.loc["stage 1 + prototypes (stage 2)"]
    stage1 = table.loc["stage 1 (LoRA)"]
    rule = table.loc["reference rule (true attributes)"]
    global_rows = table[table.index.str.startswith("global: ")]
    # the best global score with either sign (1 - accuracy is the accuracy of the negated score)
    best_global = float(global_rows[[unseen, seen]].apply(lambda c: c.where(c >= 0.5, 1 - c)).max().max())
    return [
        Result("best_global_score_pairwise", best_global, 0.5, "<=0.60 (chance 0.5)", best_global <= 0.60),
        Result("reference_rule_pairwise_unseen", rule[unseen], best_global, ">=0.95", rule[unseen] >= 0.95),
        Result("model_pairwise_unseen", model[unseen], best_global, ">=0.85", model[unseen] >= 0.85),
        Result("model_references_swapped_unseen", model[swapped], 0.5, "<=0.30", model[swapped] <= 0.30),
        Result("model_1v3_top1", model[one_vs_three], 0.25, ">=0.50 (chance 0.25)", model[one_vs_three] >= 0.5),
        Result(
            "model_seen_minus_unseen",
            abs(model[seen] - model[unseen]),
            0.0,
            "|gap|<=0.10",
            abs(model[seen] - model[unseen]) <= 0.10,
        ),
        Result(
            "stage2_vs_stage1_unseen",
            model[unseen],
            stage1[unseen],
            ">= stage 1 - 0.02",
            model[unseen] >= stage1[unseen] - 0.02,
        ),
    ]


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--small", action="store_true", help="256 training users (quicker; the targets are set for the full size)."
    )
    parser.add_argument("--output-dir", default="bench_output/learn_preference", help="Stage folders and the table.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the users and the training runs.")
    parser.add_argument("--stage1-steps", type=int, default=None, help="Override the stage 1 steps.")
    parser.add_argument("--stage1-learning-rate", type=float, default=None, help="Override the stage 1 peak rate.")
    parser.add_argument("--train-users", type=int, default=None, help="Override the number of training users.")
    args = parser.parse_args(argv)
    if args.small:
        config = small_learning_config(args.seed)
    else:
        config = LearningConfig(users=benchmark_users(args.seed), seed=args.seed)
    if args.stage1_steps is not None:
        config = replace(config, stage1_steps=args.stage1_steps)
    if args.stage1_learning_rate is not None:
        config = replace(config, stage1_learning_rate=args.stage1_learning_rate)
    if args.train_users is not None:
        config = replace(config, users=replace(config.users, train_users=args.train_users))
    wall, cpu = time.perf_counter(), time.process_time()
    report = run_learning_experiment(config, args.output_dir)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"\ntoy VLM pre-training, answer accuracy on fresh images: {report.pretraining}")
    print(f"\nLearning to read references (synthetic users, N_ref = {config.users.n_ref}):\n{report.markdown()}")
    report.save(args.output_dir)
    load = os.getloadavg()[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in report.seconds.items())
    print(f"\nwall {wall:.0f}s, CPU {cpu:.0f}s, load average {load:.1f}, peak RSS {peak:.0f} MiB ({timings})")
    results = results_from(report.table)
    for result in results:
        print(result)
    return results


if __name__ == "__main__":
    main()
