"""Train a preference prototype model (paper 003, arXiv 2508.08220) in two stages with any image-text-to-text VLM.

    # stage 1: LoRA on the language model + vision tower, L_base + L_aux
    python examples/train_preference_prototype.py --model_name_or_path HuggingFaceM4/idefics2-8b \
        --dataset your-org/pickapic-users --output_dir pref-stage1 --stage 1 --max_steps 5000 \
        --learning_rate 1e-5 --weight_decay 1e-2 --per_device_train_batch_size 2 --gradient_accumulation_steps 4 \
        --bf16 --load_in_4bit --eval_strategy steps --eval_steps 500
    # stage 2: only the 10 prototypes (kept in float32), from the stage-1 model loaded in bfloat16
    python examples/train_preference_prototype.py --model_name_or_path pref-stage1/model \
        --dataset your-org/pickapic-users --output_dir pref-stage2 --stage 2 --max_steps 16000 --learning_rate 1e-5 \
        --model_dtype bfloat16

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \
        examples/train_preference_prototype.py ...

Without `--dataset`, synthetic users with a planted colour and a tiny random LLaVA are used (a smoke run):

    python examples/train_preference_prototype.py --output_dir /tmp/pref --max_steps 20 --n_ref 2 \
        --learning_rate 2e-2 --report_to none

Every `PreferencePrototypeTrainingConfig` / `TrainingArguments` flag applies (`--resume_from_checkpoint`,
`--save_steps`, `--push_to_hub`, ...). The trained model lands in `<output_dir>/model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from imagegem_hf.distributed import end_distributed
from imagegem_hf.preference.trainer import PreferencePrototypeTrainingConfig, train_from_dataset


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Stage 1: a VLM path or repo id; stage 2: the stage-1 model folder. Omit for a tiny VLM."},
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Folder or repo from `imagegem preference build`. Omit for synthetic users."}
    )
    synthetic_users: int = field(default=16, metadata={"help": "Synthetic users when --dataset is omitted."})


def smoke_inputs(script: ScriptArguments, args: PreferencePrototypeTrainingConfig) -> tuple[str, str]:
    """Write synthetic users and (for stage 1 without a model) a tiny LLaVA next to the output folder."""
    from pathlib import Path

    from imagegem_hf.preference.data import (
        build_user_splits,
        group_pickapic_records,
        save_preference_dataset,
        synthetic_pickapic_records,
    )
    from imagegem_hf.testing import tiny_vlm

    root = Path(args.output_dir).parent / f"{Path(args.output_dir).name}_inputs"
    dataset, model = script.dataset, script.model_name_or_path
    if dataset is None:
        records, images = synthetic_pickapic_records(n_users=script.synthetic_users, tastes=("red",), seed=args.seed)
        splits = build_user_splits(
            group_pickapic_records(records), n_ref=args.n_ref, val_users=1, test_users=2, seen_users=2, seed=args.seed
        )
        dataset = str(save_preference_dataset(splits, root / "dataset", images, overwrite=True))
    if model is None:
        if args.stage == 2:
            raise ValueError("Stage 2 needs --model_name_or_path <stage-1 output_dir>/model.")
        backbone, processor = tiny_vlm(seed=args.seed)
        backbone.save_pretrained(root / "vlm")
        processor.save_pretrained(root / "vlm")
        model = str(root / "vlm")
    return model, dataset


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, PreferencePrototypeTrainingConfig))
    script, args = parser.parse_args_into_dataclasses()
    model, dataset = script.model_name_or_path, script.dataset
    if model is None or dataset is None:
        model, dataset = smoke_inputs(script, args)
    path = train_from_dataset(model, dataset, args, resume_from_checkpoint=args.resume_from_checkpoint)
    print(f"model → {path}")
    end_distributed()


if __name__ == "__main__":
    main()
