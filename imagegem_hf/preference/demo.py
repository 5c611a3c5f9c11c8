"""Demo stage `preference`: does a preference model learn to read a user's references?

Synthetic users like signed mixes of four image attributes and come in mirrored couples, so no global score (redness,
one attribute, the tiny-CLIP score, PickScore on it) beats chance; only reading *this* user's liked and disliked
references does. A toy LLaVA pre-trained on interleaved captions of such images is trained with both stages of
paper 003 on training users and evaluated on unseen users, with its references as given and swapped (a model that
reads them must then fail). `benchmarks/learn_preference.py` runs the same experiment at full size with pass/fail
targets; the README shows the commands for Pick-a-Pic and a real VLM.
"""

from __future__ import annotations

from imagegem_hf.preference.learning import demo_learning_config, run_learning_experiment


def run_demo(context) -> list[str]:
    out = context.stage_dir("preference")
    report = run_learning_experiment(demo_learning_config(context.seed), out)
    print(f"\nLearning to read references (synthetic users, unseen in training):\n{report.markdown()}")
    paths = report.save(out)
    lines = [f"stage-1 model → {out / 'stage1' / 'model'}", f"stage-2 model → {out / 'stage2' / 'model'}"]
    return lines + [f"preference learning table {name} → {path}" for name, path in paths.items()]
