"""Diffusion-DPO on Stable Diffusion 1.5 / SDXL with preference pairs (ImageGem §4.1).

    python examples/train_diffusion_dpo.py --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset org/imagegem-dpo-pairs-dogs --output_dir dpo-sd15-dogs \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 128 --max_steps 2000 --bf16

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train_diffusion_dpo.py ...

The dataset is in the exchange format (`jpg_0, jpg_1, label_0, caption`, e.g. written by
`imagegem dataset pairs ... --exchange-dir`) or ImageGem's `preference_pairs` with pixels. Every
`DiffusionDPOConfig` / `TrainingArguments` flag applies (`--mode full`, `--beta_dpo`, `--lora_alpha`,
`--proportion_empty_prompts 0.2`, `--random_flip false`, `--resume_from_checkpoint`, `--push_to_hub`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset
from diffusers import DiffusionPipeline
from transformers import HfArgumentParser

from imagegem_hf.distributed import end_distributed
from imagegem_hf.dpo import DiffusionDPOConfig, DiffusionDPOTrainer


@dataclass
class ScriptArguments:
    pretrained_model: str = field(metadata={"help": "Base pipeline: path or repo id (SD 1.5 or SDXL)."})
    dataset: str = field(metadata={"help": "Pair dataset: path, parquet folder or repo id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset config (e.g. preference_pairs)."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the pairs instead of downloading the dataset first (needs --max_steps)."},
    )
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use at most this many pairs."})


def main() -> None:
    script_args, args = HfArgumentParser((ScriptArguments, DiffusionDPOConfig)).parse_args_into_dataclasses()
    args.dataset_name = args.dataset_name or script_args.dataset  # the card's `datasets` (when a Hub id)
    pipeline = DiffusionPipeline.from_pretrained(script_args.pretrained_model)
    pairs = load_dataset(
        script_args.dataset, script_args.dataset_config, split=script_args.split, streaming=script_args.streaming
    )
    if script_args.max_train_pairs:
        if script_args.streaming:
            pairs = pairs.take(script_args.max_train_pairs)
        else:
            pairs = pairs.select(range(min(script_args.max_train_pairs, len(pairs))))
    trainer = DiffusionDPOTrainer(pipeline, args, train_dataset=pairs)
    if trainer.dropped_pairs:
        print(f"Dropped pairs: {trainer.dropped_pairs}")
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    trainer.create_model_card(model_name=args.hub_model_id)
    if args.push_to_hub:
        trainer.push_to_hub()
    end_distributed()


if __name__ == "__main__":
    main()
