"""Personalize a LoRA without retraining: build a W2W weight space from a folder of LoRAs, label the LoRAs
(anime → realistic by CLIP, a user's taste, or a CSV), learn a direction, edit a LoRA and render a strength grid.

Real models (Stable Diffusion 1.5 LoRAs, e.g. downloaded from Civitai):
    python examples/w2w_personalize.py --lora-dir loras/ --example-images examples/ \
        --clip openai/clip-vit-large-patch14 --user-lora loras/my_style.safetensors \
        --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a portrait" --output-dir w2w_out
    # a user's taste instead of ani→real: add --user-images my_images/ --description "soft pastel portraits"
    # labels you already have: --labels labels.csv (columns model,label with model = file stem)

Offline, on synthetic LoRAs of a tiny random UNet (a minute on a CPU):
    python examples/w2w_personalize.py --tiny --output-dir w2w_tiny
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from imagegem_hf.w2w import (
    WeightSpace,
    preference_direction,
    preference_labels,
    save_lora,
    style_labels,
    w2w_pipeline_from_base,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _images(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def _labels(args, model_ids: list[str]) -> dict[str, int]:
    if args.labels:
        with open(args.labels, newline="", encoding="utf-8") as handle:
            return {row["model"]: int(float(row["label"])) for row in csv.DictReader(handle)}
    if not (args.example_images and args.clip):
        raise SystemExit("Give --labels, or --example-images and --clip to label the LoRAs by CLIP.")
    from imagegem_hf.embeddings import CLIPEmbedder

    embedder = CLIPEmbedder.from_pretrained(args.clip, device=args.device)
    model_images = {
        m: _images(Path(args.example_images) / m) for m in model_ids if (Path(args.example_images) / m).is_dir()
    }
    if args.user_images:
        describer = None
        if args.description is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            from imagegem_hf.w2w import VLMDescriber

            vlm = AutoModelForImageTextToText.from_pretrained(args.vlm).to(args.device)
            describer = VLMDescriber(vlm, AutoProcessor.from_pretrained(args.vlm))
        result = preference_labels(
            _images(Path(args.user_images)), model_images, embedder, description=args.description, describer=describer
        )
        print(f"User preference: {result.description!r} ({result.cluster_size} images in the main cluster)")
        return result.labels
    result = style_labels(model_images, embedder)
    print(f"Style labels: {len(result.labels)} kept, {len(result.dropped)} dropped")
    return result.labels


def _tiny(args) -> None:
    from imagegem_hf.testing import tiny_sd_pipeline
    from imagegem_hf.w2w.demo import ATTENTION_TARGETS, synthetic_loras
    from imagegem_hf.w2w.lora_io import lora_target_shapes

    sd = tiny_sd_pipeline(seed=args.seed)
    loras, labels, _ = synthetic_loras(lora_target_shapes(sd.unet, ATTENTION_TARGETS), n=40, seed=args.seed)
    lora_dir = Path(args.output_dir) / "loras"
    for i, lora in enumerate(loras):
        save_lora(lora, lora_dir / f"m{i:03d}.safetensors", format="kohya")
    args.lora_dir, args.user_lora = str(lora_dir), str(lora_dir / "m000.safetensors")
    args.components = min(args.components, 16)
    args.height = args.width = 32
    args.steps = 4
    sd.save_pretrained(Path(args.output_dir) / "tiny_base")
    args.base_model = str(Path(args.output_dir) / "tiny_base")
    args.labels = str(Path(args.output_dir) / "labels.csv")
    with open(args.labels, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("model", "label"), *((f"m{i:03d}", int(y)) for i, y in enumerate(labels))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-dir", help="Folder of LoRA .safetensors files (one base model).")
    parser.add_argument("--space", default=None, help="Use this saved space instead of building one.")
    parser.add_argument("--components", type=int, default=64, help="Principal components of the space.")
    parser.add_argument("--base", default=None, help="Required base architecture (sd15, sdxl).")
    parser.add_argument("--labels", default=None, help="CSV with columns model,label (±1).")
    parser.add_argument(
        "--example-images", default=None, help="Folder with one sub-folder of example images per LoRA."
    )
    parser.add_argument("--clip", default=None, help="CLIP model for labels, e.g. openai/clip-vit-large-patch14.")
    parser.add_argument("--user-images", default=None, help="A user's images: label by their taste, not ani→real.")
    parser.add_argument("--description", default=None, help="The user's taste in words (else --vlm writes it).")
    parser.add_argument("--vlm", default="Qwen/Qwen2-VL-2B-Instruct", help="VLM describing the user's images.")
    parser.add_argument("--method", choices=["logistic", "svm", "lstsq"], default="logistic")
    parser.add_argument("--user-lora", default=None, help="The LoRA to edit.")
    parser.add_argument("--strengths", default="-2,0,2,4", help="Comma-separated strengths (use --strengths=-2,…).")
    parser.add_argument("--base-model", default=None, help="Stable Diffusion 1.5 folder or repo id for the grid.")
    parser.add_argument("--sdxl", action="store_true", help="The base model (and the LoRAs) are SDXL.")
    parser.add_argument("--prompt", default="a portrait photo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--push-to-hub", default=None, help="Push the space to this repo id.")
    parser.add_argument("--tiny", action="store_true", help="Offline run on synthetic LoRAs of a tiny UNet.")
    parser.add_argument("--output-dir", default="w2w_output")
    args = parser.parse_args()
    out = Path(args.output_dir)
    if args.tiny:
        _tiny(args)

    if args.space:
        space = WeightSpace.from_pretrained(args.space)
    else:
        if not args.lora_dir:
            raise SystemExit("Give --lora-dir (or --space, or --tiny).")
        files = sorted(Path(args.lora_dir).glob("*.safetensors"))
        space = WeightSpace.build(files, n_components=min(args.components, len(files) - 1), base=args.base)
        space.save_pretrained(out / "space")
        print(f"Weight space over {len(files)} LoRAs → {out / 'space'}")
    if args.push_to_hub:
        print(f"Pushed → {space.push_to_hub(args.push_to_hub)}")

    model_ids = list(space.config.model_ids)
    labels = _labels(args, model_ids)
    rows = [i for i, m in enumerate(model_ids) if m in labels]
    direction = preference_direction(
        space, space.training_coefficients()[rows], np.array([labels[model_ids[i]] for i in rows]), method=args.method
    )
    direction.save(out / "direction.safetensors")
    print(f"Direction: held-out accuracy {direction.accuracy}, {direction.n_positive}/{direction.n_negative} LoRAs")

    if args.user_lora:
        strengths = [float(s) for s in args.strengths.split(",")]
        for strength in strengths:
            save_lora(space.edit(args.user_lora, direction, strength), out / f"edited_alpha{strength:g}.safetensors")
        print(f"Edited LoRAs → {out}/edited_alpha*.safetensors")
        if args.base_model:
            pipe = w2w_pipeline_from_base(args.base_model, space, sdxl=args.sdxl)
            pipe = pipe.to(args.device)
            result = pipe(
                args.prompt,
                lora=args.user_lora,
                direction=direction,
                strengths=strengths,
                seed=args.seed,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                height=args.height,
                width=args.width,
            )
            result.grid.save(out / "grid.png")
            print(f"Grid → {out / 'grid.png'}")


if __name__ == "__main__":
    main()
