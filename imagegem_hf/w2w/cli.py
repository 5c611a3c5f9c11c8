"""`imagegem w2w build|direction|edit|grid`: weight spaces over LoRA files, directions from labels, LoRA edits."""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("w2w", help="LoRA weight spaces (weights2weights): build, direction, edit, grid.")
    commands = parser.add_subparsers(dest="w2w_command", required=True, metavar="W2W_COMMAND")

    build = commands.add_parser("build", help="Build a WeightSpace from LoRA safetensors files.")
    build.add_argument("loras", nargs="+", help="LoRA .safetensors files or folders of them.")
    build.add_argument("--output", required=True, help="Folder to save the space to (save_pretrained layout).")
    build.add_argument("--components", type=int, default=64, help="Principal components m (≤ number of LoRAs − 1).")
    build.add_argument("--rank", type=int, default=1, help="Singular components kept per layer (1 = ImageGem).")
    build.add_argument(
        "--layers",
        choices=["attn_v", "ff", "both"],
        default=None,
        help="Keep only these UNet layers (the paper's alternative to rank-1 reduction, e.g. with --rank 16).",
    )
    build.add_argument("--base", default=None, help="Required base architecture: sd15, sd2 or sdxl.")
    build.add_argument("--no-standardize", action="store_true", help="Do not z-score coordinates before PCA.")
    build.add_argument(
        "--align-signs",
        action="store_true",
        help="Fix the LoRAs' component signs by the population's axes instead of each LoRA's own rule (ImageGem's); "
        "WeightSpace.build's align_signs.",
    )
    build.add_argument("--cache-dir", default=None, help="Where the temporary N × d disk cache goes.")
    build.add_argument(
        "--num-workers",
        type=int,
        default=(os.cpu_count() or 1) + 1,
        help="Processes reading and reducing LoRAs (default: one more than the CPUs, so that one can wait on the disk "
        "while the others compute).",
    )
    build.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="Also upload the space to this repo.")
    build.set_defaults(func=_build)

    direction = commands.add_parser("direction", help="Learn a unit edit direction from ±1 labels.")
    direction.add_argument("space", help="Weight space folder or Hub repo id.")
    direction.add_argument(
        "--labels",
        required=True,
        help="CSV with columns model,label: model is a model id of the space (a file stem) or a LoRA path; "
        "label is ±1 or 0/1.",
    )
    direction.add_argument("--method", choices=["logistic", "svm", "lstsq"], default="logistic")
    direction.add_argument("--test-fraction", type=float, default=0.2, help="Held-out fraction for the accuracy.")
    direction.add_argument("--name", default="direction", help="Name stored with the direction.")
    direction.add_argument("--seed", type=int, default=0)
    direction.add_argument("--output", required=True, help="Direction .safetensors file to write.")
    direction.set_defaults(func=_direction)

    edit = commands.add_parser("edit", help="Move a LoRA along one or more directions and write it.")
    edit.add_argument("space", help="Weight space folder or Hub repo id.")
    edit.add_argument("lora", help="The LoRA .safetensors file to edit.")
    edit.add_argument("--direction", action="append", required=True, help="Direction file (repeat for several).")
    edit.add_argument("--strength", type=float, action="append", required=True, help="α per --direction.")
    edit.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers", help="Output LoRA format.")
    edit.add_argument("--output", required=True, help="Edited LoRA .safetensors file.")
    edit.set_defaults(func=_edit)

    grid = commands.add_parser("grid", help="Generate one image per strength (same seed) and save a grid PNG.")
    grid.add_argument("--base-model", required=True, help="Stable Diffusion 1.5 (or, with --sdxl, SDXL) folder/repo.")
    grid.add_argument("--sdxl", action="store_true", help="The base model is SDXL (W2WEditXLPipeline).")
    grid.add_argument("--space", required=True, help="Weight space folder or Hub repo id.")
    grid.add_argument("--lora", required=True, help="The LoRA .safetensors file.")
    grid.add_argument("--direction", required=True, help="Direction .safetensors file.")
    grid.add_argument(
        "--strengths",
        default="-2,0,2,4",
        help="Comma-separated strengths α; write --strengths=-2,0,2 when the first is negative.",
    )
    grid.add_argument("--prompt", required=True)
    grid.add_argument("--negative-prompt", default=None)
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--steps", type=int, default=30, help="Denoising steps (ImageGem: 30).")
    grid.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale (ImageGem: 5).")
    grid.add_argument("--height", type=int, default=None)
    grid.add_argument("--width", type=int, default=None)
    grid.add_argument("--injection-timestep", type=int, default=None, help="Delayed injection threshold.")
    grid.add_argument("--device", default="cpu")
    grid.add_argument("--output", required=True, help="Grid PNG; the single images go next to it.")
    grid.set_defaults(func=_grid)

    from imagegem_hf.fetch.cli import register_w2w_commands

    register_w2w_commands(commands)


def _lora_files(items: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(path.glob("*.safetensors"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{item} is neither a LoRA file nor a folder.")
    if len(files) < 2:
        raise ValueError(f"Found {len(files)} LoRA file(s); a weight space needs at least 2.")
    return files


def _build(args: argparse.Namespace) -> int:
    from imagegem_hf.w2w.space import WeightSpace

    files = _lora_files(args.loras)
    space = WeightSpace.build(
        files,
        n_components=args.components,
        standardize=not args.no_standardize,
        align_signs=args.align_signs,
        rank=args.rank,
        base=args.base,
        cache_dir=args.cache_dir,
        num_workers=args.num_workers,
        layers=args.layers,
    )
    space.save_pretrained(args.output)
    zero_filled = sum(space.config.missing_counts or [])
    print(
        f"Weight space: {len(files)} LoRAs, {len(space.config.module_names)} modules, vector length "
        f"{space.vector_length}, {space.n_components} components explaining "
        f"{100 * space.explained_variance_ratio().sum():.1f}% of the variance, {zero_filled} zero-filled module "
        f"entries → {args.output} (scree plot: explained_variance.png)"
    )
    if args.push_to_hub:
        print(f"Pushed → {space.push_to_hub(args.push_to_hub)}")
    return 0


def _read_labels(path: str) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"model", "label"} <= set(rows[0]):
        raise ValueError(f"{path} must be a CSV with a header and columns 'model' and 'label'.")
    return [row["model"] for row in rows], [int(float(row["label"])) for row in rows]


def _direction(args: argparse.Namespace) -> int:
    import numpy as np

    from imagegem_hf.w2w.directions import preference_direction
    from imagegem_hf.w2w.space import WeightSpace

    space = WeightSpace.from_pretrained(args.space)
    models, labels = _read_labels(args.labels)
    index = {model_id: i for i, model_id in enumerate(space.config.model_ids or [])}
    if all(m in index for m in models):
        data = space.training_coefficients()[[index[m] for m in models]]
    else:
        data = [Path(m) for m in models]
    direction = preference_direction(
        space,
        data,
        np.array(labels),
        method=args.method,
        test_fraction=args.test_fraction,
        seed=args.seed,
        name=args.name,
    )
    direction.save(args.output)
    accuracy = "n/a" if direction.accuracy is None else f"{direction.accuracy:.3f}"
    print(
        f"Direction {args.name!r} ({args.method}): {direction.n_positive} positive / {direction.n_negative} negative "
        f"LoRAs, held-out accuracy {accuracy}, train accuracy {direction.train_accuracy:.3f} → {args.output}"
    )
    return 0


def _edit(args: argparse.Namespace) -> int:
    from imagegem_hf.w2w.directions import Direction
    from imagegem_hf.w2w.lora_io import save_lora
    from imagegem_hf.w2w.space import WeightSpace

    if len(args.direction) != len(args.strength):
        raise ValueError(f"Got {len(args.direction)} --direction but {len(args.strength)} --strength values.")
    space = WeightSpace.from_pretrained(args.space)
    directions = [Direction.load(path) for path in args.direction]
    edited = space.edit(args.lora, directions, args.strength)
    save_lora(edited, args.output, format=args.format)
    print(f"Edited LoRA ({args.format}) → {args.output}")
    return 0


def _grid(args: argparse.Namespace) -> int:
    from imagegem_hf.w2w import w2w_pipeline_from_base
    from imagegem_hf.w2w.directions import Direction
    from imagegem_hf.w2w.space import WeightSpace

    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    space = WeightSpace.from_pretrained(args.space)
    pipe = w2w_pipeline_from_base(args.base_model, space, sdxl=args.sdxl)
    pipe = pipe.to(args.device)
    result = pipe(
        args.prompt,
        lora=args.lora,
        direction=Direction.load(args.direction),
        strengths=strengths,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        injection_timestep=args.injection_timestep,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result.grid.save(output)
    for strength, image in zip(strengths, result.images, strict=True):
        image.save(output.with_name(f"{output.stem}_alpha{strength:g}.png"))
    print(f"Grid of {len(strengths)} strengths → {output}")
    return 0
