"""Two-stage training of a `PreferencePrototypeModel` with the standard `transformers.Trainer`.

Paper 003 (arXiv 2508.08220, REFERENCE §7): stage 1 fine-tunes the VLM with LoRA (QLoRA on a GPU) on the language
model, optionally training the vision encoder too, with `L_base + L_aux`; stage 2 starts from the stage-1 model,
adds the learnable preference prototypes and trains only them with the same loss. The reference turns of every
example are shuffled on every step.

`PreferencePrototypeTrainingConfig` is a `TrainingArguments` (so `--output_dir`, `--max_steps`, `--save_steps`,
`--resume_from_checkpoint`, `accelerate launch` ... all work as usual); `PreferencePrototypeTrainer` overrides
`compute_loss`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import Trainer, TrainingArguments

from imagegem_hf.hub import atomic_directory, render_card
from imagegem_hf.preference.data import PreferenceCollator, PreferenceExample
from imagegem_hf.preference.losses import preference_loss
from imagegem_hf.preference.modeling_preference_prototype import PreferencePrototypeModel

# Vision encoders and their projectors into the language model (LLaVA, Idefics2/3 and SmolVLM, Qwen2-VL).
VISION_MODULE_NAMES = ("vision_tower", "multi_modal_projector", "vision_model", "connector", "visual")


@dataclass
class PreferencePrototypeTrainingConfig(TrainingArguments):
    """Training arguments of [`PreferencePrototypeTrainer`] (paper 003's settings as help text).

    Example:
        ```python
        >>> from imagegem_hf.preference.trainer import PreferencePrototypeTrainingConfig
        >>> args = PreferencePrototypeTrainingConfig(output_dir="out/stage1", stage=1, max_steps=10, report_to="none")
        >>> args.lora_r
        8
        ```
    """

    stage: int = field(
        default=1,
        metadata={"help": "1: LoRA on the language model (+ vision tower); 2: train only the prototypes."},
    )
    num_prototypes: int = field(
        default=10, metadata={"help": "Preference prototypes added in stage 2 (L_p; the paper uses 10)."}
    )
    n_ref: int = field(default=8, metadata={"help": "Reference pairs per example (N_ref; the paper uses 8)."})
    aux_weight: float = field(default=1.0, metadata={"help": "Weight of L_aux in L_base + w·L_aux (paper: 1)."})
    shuffle_references: bool = field(
        default=True, metadata={"help": "Shuffle the order of the reference turns on every step."}
    )
    lora_r: int = field(default=8, metadata={"help": "Stage 1 LoRA rank (paper: 8)."})
    lora_alpha: int = field(default=8, metadata={"help": "Stage 1 LoRA alpha (paper: 8)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Stage 1 LoRA dropout (paper: 0.1)."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj",
        metadata={"help": "Comma-separated names of the language model's linear layers that get LoRA."},
    )
    train_vision_tower: bool = field(
        default=True,
        metadata={"help": "Stage 1: also train the vision encoder and its projector fully (the paper does)."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Stage 1 QLoRA: load the backbone in 4 bit (needs CUDA and bitsandbytes)."}
    )

    def __post_init__(self):
        self.remove_unused_columns = False  # rows are PreferenceExamples, collated into model inputs
        super().__post_init__()
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}.")
        if self.load_in_4bit and not torch.cuda.is_available():
            raise ValueError("load_in_4bit (QLoRA) needs a CUDA device and bitsandbytes; drop --load_in_4bit on CPU.")


def prepare_stage1(model: PreferencePrototypeModel, args: PreferencePrototypeTrainingConfig):
    """Wrap `model` with LoRA on its language model (peft); the vision tower stays trainable if requested.

    Returns:
        The `PeftModel`.
    """
    from peft import LoraConfig, get_peft_model

    names = "|".join(n.strip() for n in args.lora_target_modules.split(",") if n.strip())
    modules_to_save = None
    if args.train_vision_tower:
        found = {n.split(".")[-1] for n, _ in model.backbone.named_modules()}
        modules_to_save = [n for n in VISION_MODULE_NAMES if n in found]  # trained in full, saved with the adapter
        if not modules_to_save:
            raise ValueError(
                f"train_vision_tower: the backbone has no module named one of {VISION_MODULE_NAMES}; "
                "pass --train_vision_tower false."
            )
    if getattr(model.backbone, "is_loaded_in_4bit", False):  # QLoRA
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model.backbone, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=rf".*language_model.*\.({names})",
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, lora)


def prepare_stage2(model: PreferencePrototypeModel) -> PreferencePrototypeModel:
    """Freeze everything except the prototypes (paper 003, stage 2).

    Raises:
        ValueError: The model has no prototypes (load the stage-1 model with `num_prototypes=...`).
    """
    if model.prototypes is None:
        raise ValueError("Stage 2 trains the prototypes, but the model has none; load it with num_prototypes > 0.")
    model.requires_grad_(False)
    model.prototypes.requires_grad_(True)
    return model


class PreferencePrototypeTrainer(Trainer):
    """`Trainer` with paper 003's loss: each batch scores the liked and the disliked target of every example with the
    same references, and `compute_loss` returns `L_base + aux_weight · L_aux`.

    Args:
        model: The (peft-wrapped in stage 1) `PreferencePrototypeModel`.
        args: [`PreferencePrototypeTrainingConfig`].
        train_dataset: A sequence of `PreferenceExample`s.
        eval_dataset: Validation examples (the validation users, never the training set).
        data_collator: A [`PreferenceCollator`].

    Example:
        ```python
        >>> trainer = PreferencePrototypeTrainer(model=model, args=args, train_dataset=train,
        ...                                      data_collator=collator)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        ```
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        half = labels.shape[0] // 2
        if half == 0 or not bool(labels[:half].all()) or bool(labels[half:].any()):
            raise ValueError("Batches must hold the liked targets then the disliked ones (use PreferenceCollator).")
        outputs = model(**inputs)
        parts = preference_loss(outputs.logits[:half], outputs.logits[half:], aux_weight=self.args.aux_weight)
        if model.training and self.state.global_step % max(self.args.logging_steps, 1) == 0:
            self._last_parts = {k: float(v.detach()) for k, v in parts.items()}
        return (parts["loss"], outputs) if return_outputs else parts["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, dict(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        parts = getattr(self, "_last_parts", None)
        if parts is not None and "loss" in logs:
            logs = {**logs, "loss_base": round(parts["base"], 4), "loss_aux": round(parts["aux"], 4)}
        super().log(logs, *args, **kwargs)


def train_preference_model(
    model: PreferencePrototypeModel | str | os.PathLike,
    processor,
    train_examples: Sequence[PreferenceExample],
    load_image: Callable[[str], Image.Image],
    args: PreferencePrototypeTrainingConfig,
    eval_examples: Sequence[PreferenceExample] | None = None,
    resume_from_checkpoint: str | bool | None = None,
) -> PreferencePrototypeModel:
    """Run one training stage and save the resulting full model (merged LoRA) with its processor and a card in
    `<args.output_dir>/model` (the Trainer's checkpoints sit next to it in `args.output_dir`).

    Args:
        model: Stage 1: a model (e.g. from `PreferencePrototypeModel.from_backbone`, built with
            `num_prototypes=0`). Stage 2: the stage-1 model folder (`<stage-1 output_dir>/model`), loaded with
            `args.num_prototypes` new prototypes.
        processor: The backbone's processor.
        train_examples: Training examples.
        load_image: Image key → PIL image.
        args: The training configuration.
        eval_examples: Validation examples.
        resume_from_checkpoint: Passed to `Trainer.train` (a checkpoint folder, or True for the latest).

    Returns:
        The trained `PreferencePrototypeModel` (LoRA merged).

    Example:
        ```python
        >>> stage1 = train_preference_model(model, processor, train, images.__getitem__, args1)  # doctest: +SKIP
        >>> stage2 = train_preference_model("out/s1/model", processor, train, images.get, args2)  # doctest: +SKIP
        ```
    """
    from imagegem_hf.preference.sequence import PreferenceSequenceBuilder

    if not isinstance(model, PreferencePrototypeModel):
        overrides = {"num_prototypes": args.num_prototypes} if args.stage == 2 else {}
        model = PreferencePrototypeModel.from_pretrained(model, **overrides)
    elif args.stage == 2 and model.prototypes is None:
        raise ValueError("Stage 2 from an in-memory model needs prototypes; pass the stage-1 folder instead.")
    builder = PreferenceSequenceBuilder.from_config(processor, model.config)
    # The shared-prefix batch reuses a KV cache, which activation checkpointing disables: with checkpointing on,
    # each target is scored on its full sequence instead (same logits, more compute, far less activation memory).
    collator = PreferenceCollator(
        builder,
        load_image,
        n_ref=args.n_ref,
        shuffle_references=args.shuffle_references,
        seed=args.seed,
        share_prefix=not args.activation_checkpointing,
    )
    trainable = prepare_stage1(model, args) if args.stage == 1 else prepare_stage2(model)
    trainer = PreferencePrototypeTrainer(
        model=trainable,
        args=args,
        train_dataset=list(train_examples),
        eval_dataset=list(eval_examples) if eval_examples else None,
        data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trained = trainable.merge_and_unload() if args.stage == 1 else trainable
    trained.eval()
    if trainer.is_world_process_zero():
        save_preference_model(trained, processor, Path(args.output_dir) / "model", stage=args.stage, overwrite=True)
    return trained


def save_preference_model(
    model: PreferencePrototypeModel,
    processor,
    output_dir: str | os.PathLike,
    stage: int | None = None,
    metrics: dict[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the model (safetensors + config), its processor and a model card into `output_dir`, atomically.

    Example:
        ```python
        >>> save_preference_model(model, processor, "out/preference-model")  # doctest: +SKIP
        ```
    """
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        config = {k: v for k, v in model.config.to_dict().items() if k != "backbone_config"}
        card = render_card(
            "preference_card.md",
            kind="model",
            backbone=model.config.backbone_config.model_type,
            stage=stage if stage is not None else "n/a",
            config=config,
            metrics=metrics or {},
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(output_dir)


def train_from_dataset(
    model_name_or_path: str | os.PathLike,
    dataset: str | os.PathLike,
    args: PreferencePrototypeTrainingConfig,
    resume_from_checkpoint: str | bool | None = None,
) -> Path:
    """Train one stage on a dataset folder (or Hub repo) from `save_preference_dataset`.

    Stage 1 loads `model_name_or_path` as an `AutoModelForImageTextToText` with its processor (4 bit with
    `args.load_in_4bit`) and wraps it without prototypes; stage 2 loads the stage-1 model folder. Validation uses the
    validation users.

    Returns:
        The folder of the trained model (`<args.output_dir>/model`).

    Example:
        ```python
        >>> args = PreferencePrototypeTrainingConfig(output_dir="out/s1", stage=1, max_steps=5000)  # doctest: +SKIP
        >>> train_from_dataset("HuggingFaceM4/idefics2-8b", "me/pickapic-users", args)  # doctest: +SKIP
        ```
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from imagegem_hf.hub import resolve
    from imagegem_hf.preference.data import load_preference_dataset

    splits, images = load_preference_dataset(dataset)
    if not images:
        raise ValueError(f"{dataset} has no images table; rebuild it with the image bytes columns.")
    if "train" not in splits:
        raise ValueError(f"{dataset} has no train split (splits: {sorted(splits)}).")
    model_dir = resolve(model_name_or_path)
    processor = AutoProcessor.from_pretrained(model_dir)
    if args.stage == 1:
        kwargs = {}
        if args.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        backbone = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
        model, _ = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=0, n_ref=args.n_ref)
    else:
        model = model_dir
    train_preference_model(
        model,
        processor,
        splits["train"],
        images.__getitem__,
        args,
        eval_examples=splits.get("validation"),
        resume_from_checkpoint=resume_from_checkpoint,
    )
    return Path(args.output_dir) / "model"
