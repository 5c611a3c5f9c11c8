"""Demo stage `dpo`: pairs from the sample scored by a tiny reward model → a few Diffusion-DPO steps on a tiny
Stable Diffusion → base vs tuned evaluation table and image grid.

The sample has no pixels, so each image is a deterministic placeholder and the models are tiny and random: the
stage proves the whole path (scoring, clustering, pairing, exchange format, training, checkpoint reload,
evaluation), not alignment quality. The README shows the real-model commands.
"""

from __future__ import annotations

import pandas as pd

from imagegem_hf.data.pairs import exchange_format, image_dir_loader, make_preference_pairs
from imagegem_hf.dpo.config import DiffusionDPOConfig
from imagegem_hf.dpo.evaluate import evaluate_pipelines
from imagegem_hf.dpo.trainer import DiffusionDPOTrainer, load_dpo_weights
from imagegem_hf.ranker.items import placeholder_image
from imagegem_hf.scoring import CLIPScore, HPSv2, PickScore
from imagegem_hf.testing import tiny_clip_model, tiny_sd_pipeline

SAMPLE_IMAGES = 400
TRAIN_STEPS = 20
EVAL_PROMPTS = 4


def run_demo(context) -> list[str]:
    out = context.stage_dir("dpo")
    images = pd.read_parquet(context.artifacts["dataset_dir"] / "images").dropna(subset=["prompt"])
    images = images.drop_duplicates("imageId").sample(min(SAMPLE_IMAGES, len(images)), random_state=context.seed)
    pixel_dir = out / "pixels"
    pixel_dir.mkdir(exist_ok=True)
    for image_id in images["imageId"]:
        placeholder_image(int(image_id), size=32).save(pixel_dir / f"{image_id}.png")
    clip, processor = tiny_clip_model(seed=context.seed)
    pick = PickScore(clip, processor)
    pairs = make_preference_pairs(images, scorer=pick, locate=image_dir_loader(pixel_dir), min_cluster_size=3)
    if pairs.empty:
        raise ValueError("No preference pair could be built from the sample; use more users.")
    train_set = exchange_format(pairs, image_dir_loader(pixel_dir), seed=context.seed)
    print(f"{len(pairs)} pairs (tiny PickScore, min-max per prompt cluster) → exchange format")

    pipe = tiny_sd_pipeline(seed=context.seed)
    args = DiffusionDPOConfig(
        str(out / "run"),
        resolution=32,
        per_device_train_batch_size=4,
        max_steps=TRAIN_STEPS,
        learning_rate=1e-3,
        lora_rank=4,
        proportion_empty_prompts=0.2,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=context.seed,
        disable_tqdm=True,
    )
    trainer = DiffusionDPOTrainer(pipe, args, train_dataset=train_set)
    trainer.train()
    trainer.save_model(str(out / "lora"))
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    print(
        f"Diffusion-DPO, {TRAIN_STEPS} steps: loss {last['loss']:.4f}, implicit accuracy "
        f"{last['rewards/accuracies']:.2f}, reward margin {last['rewards/margins']:.4f}"
    )

    tuned = tiny_sd_pipeline(seed=context.seed)
    load_dpo_weights(tuned, out / "lora")
    prompts = pairs["prompt"].drop_duplicates().head(EVAL_PROMPTS).tolist()
    scorers = {"PickScore": pick, "HPSv2": HPSv2(clip, processor), "CLIP": CLIPScore(clip, processor)}
    report = evaluate_pipelines(
        {"tiny SD": tiny_sd_pipeline(seed=context.seed), "tiny SD + DPO": tuned},
        prompts,
        scorers,
        seeds=(0, 1),
        subset="sample",
        num_inference_steps=4,
        height=32,
        width=32,
    )
    print(report.table())
    paths = report.save(out)
    return [f"{len(pairs)} pairs; LoRA → {out / 'lora'}"] + [f"{k} → {v}" for k, v in paths.items()]
