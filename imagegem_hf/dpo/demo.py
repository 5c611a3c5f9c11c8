"""Demo stage `dpo`: Diffusion-DPO in the toy world, where its effect can be seen and measured.

The shipped toy base (`imagegem_hf.toy`) samples the training prompts; `ToyReward` (a bolder, bigger subject is
better) scores its images; prompts are clustered with HDBSCAN and paired min-max; `DiffusionDPOTrainer` trains a
LoRA on the pairs; base and tuned generate the held-out prompts with the same seeds. The grid shows both rows with
each image's reward under it. `benchmarks/learn_dpo.py` runs the same path at full size against a control.
"""

from __future__ import annotations

from imagegem_hf.toy import captioned_grid
from imagegem_hf.toy.dpo import BASE_NAME, ToyDPOConfig, evaluate_toy_dpo, mine_toy_pairs, train_toy_dpo

# Smaller than the benchmark (8 train seeds, 12 eval seeds, 300 steps): about two minutes of one CPU thread.
DEMO_CONFIG = ToyDPOConfig(train_seeds=4, eval_seeds=3, max_steps=150)
TUNED_NAME = "toy SD + DPO"


def run_demo(context) -> list[str]:
    out = context.stage_dir("dpo")
    config = DEMO_CONFIG
    pairs, dataset = mine_toy_pairs(out, config)
    print(f"{len(pairs)} pairs (ToyReward, min-max per HDBSCAN prompt cluster) from the toy base's own samples")
    metrics = train_toy_dpo(dataset, out / "lora", config)
    print(
        f"Diffusion-DPO, {config.max_steps} steps: loss {metrics['loss']:.4f}, implicit accuracy "
        f"{metrics['rewards/accuracies']:.2f}, reward margin {metrics['rewards/margins']:.2f}"
    )
    report, stats = evaluate_toy_dpo({TUNED_NAME: out / "lora"}, config)
    print(report.table())
    gain = stats[TUNED_NAME]
    paths = report.save(out)
    # One column per held-out prompt (its first seed), base above tuned, the reward under each image.
    scores = report.scores
    columns = list(range(0, len(scores[scores.model == BASE_NAME]), config.eval_seeds))
    rows = [[report.images[name][i] for i in columns] for name in (BASE_NAME, TUNED_NAME)]
    captions = [
        [f"{scores[scores.model == name].reward.iloc[i]:.1f}" for i in columns] for name in (BASE_NAME, TUNED_NAME)
    ]
    prompts = scores[scores.model == BASE_NAME].prompt.iloc[columns].str.removeprefix("a ").tolist()
    paths["reward grid"] = out / "dpo_reward_grid.png"
    captioned_grid(rows, ["base", "DPO"], captions, column_titles=prompts, cell=80).save(paths["reward grid"])
    return [
        f"{len(pairs)} pairs; LoRA → {out / 'lora'}",
        f"held-out: win rate {gain['win_rate']:.2f}, mean reward {gain['mean_gain']:+.2f} over {gain['n']} images; "
        f"attribute accuracy {gain['accuracy']:.2f} (base {gain['base_accuracy']:.2f})",
    ] + [f"{k} → {v}" for k, v in paths.items()]
