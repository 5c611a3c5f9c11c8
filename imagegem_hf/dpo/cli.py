"""`imagegem dpo eval`: base vs Diffusion-DPO-tuned pipeline on a prompt file, scored like ImageGem Table 4."""

from __future__ import annotations

import argparse
from pathlib import Path

# --scorers name: (class in imagegem_hf.scoring, table column)
_SCORERS = {"pickscore": ("PickScore", "PickScore"), "hpsv2": ("HPSv2", "HPSv2"), "clip": ("CLIPScore", "CLIP")}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dpo", help="Diffusion-DPO: evaluate a tuned pipeline against its base.")
    commands = parser.add_subparsers(dest="dpo_command", required=True, metavar="SUBCOMMAND")
    evaluate = commands.add_parser("eval", help="Generate with base and tuned pipelines (same seeds) and score.")
    evaluate.add_argument("base", help="Base pipeline: path or repo id (e.g. stable-diffusion-v1-5/...).")
    evaluate.add_argument("checkpoint", help="A DiffusionDPOTrainer output or checkpoint folder.")
    evaluate.add_argument("--prompts", required=True, help="Text file, one prompt per line.")
    evaluate.add_argument("--subset", default="", help="Name of the prompt set, shown in the table.")
    evaluate.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds per prompt.")
    evaluate.add_argument("--scorers", default="pickscore,hpsv2,clip", help="Comma-separated: pickscore,hpsv2,clip.")
    for name, (class_name, _) in _SCORERS.items():
        evaluate.add_argument(
            f"--{name}-model",
            default=None,
            help=f"Path or repo id of the {class_name} model and its processor (default: the paper's).",
        )
    evaluate.add_argument("--steps", type=int, default=50, help="Inference steps.")
    evaluate.add_argument("--guidance-scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    evaluate.add_argument("--batch-size", type=int, default=4, help="Images per pipeline call.")
    evaluate.add_argument(
        "--device",
        default=None,
        help="Device of the pipelines and scorers (default: this process's GPU under `accelerate launch`, else the "
        "GPU, else the CPU; `cuda` is this process's GPU).",
    )
    evaluate.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    evaluate.add_argument("--output-dir", default="dpo_eval", help="Where the table, scores and grid go.")
    evaluate.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline

    import imagegem_hf.scoring as scoring
    from imagegem_hf.distributed import is_main_process, local_device
    from imagegem_hf.dpo.evaluate import evaluate_pipelines
    from imagegem_hf.dpo.trainer import load_dpo_weights

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    names = [name.strip() for name in args.scorers.split(",") if name.strip()]
    unknown = sorted(set(names) - set(_SCORERS))
    if unknown:
        raise ValueError(f"Unknown scorer(s) {unknown}; choose from {sorted(_SCORERS)}.")
    dtype = getattr(torch, args.dtype)
    device = local_device(args.device)
    scorers = {}
    for name in names:
        class_name, column = _SCORERS[name]
        scorer_class, path = getattr(scoring, class_name), getattr(args, f"{name}_model")
        if path is None:
            scorers[column] = scorer_class.from_pretrained(device=device, dtype=dtype)
        elif name == "hpsv2":
            scorers[column] = scorer_class.from_pretrained(path, device=device, dtype=dtype)
        else:  # PickScore / CLIP score: the processor sits next to the model
            scorers[column] = scorer_class.from_pretrained(path, path, device=device, dtype=dtype)
    base = DiffusionPipeline.from_pretrained(args.base, dtype=dtype).to(device)
    tuned = DiffusionPipeline.from_pretrained(args.base, dtype=dtype).to(device)
    load_dpo_weights(tuned, args.checkpoint)
    report = evaluate_pipelines(
        {Path(args.base).name: base, f"{Path(args.base).name} + DPO": tuned},
        prompts,
        scorers,
        seeds=[int(s) for s in args.seeds.split(",")],
        subset=args.subset,
        batch_size=args.batch_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    if not is_main_process():  # under `accelerate launch` every process generated and scored its share; one writes
        return 0
    print(report.table())
    for kind, path in report.save(args.output_dir).items():
        print(f"{kind} → {path}")
    return 0
