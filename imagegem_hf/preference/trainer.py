"""Two-stage training of a `PreferencePrototypeModel` with the standard `transformers.Trainer`.

Paper 003 (arXiv 2508.08220, REFERENCE §7): stage 1 fine-tunes the VLM with LoRA (QLoRA on a GPU) on the language
model, optionally training the vision encoder too, with `L_base + L_aux`; stage 2 starts from the stage-1 model,
adds the learnable preference prototypes and trains only them with the same loss. The reference turns of every
example are shuffled anew in every epoch.

`PreferencePrototypeTrainingConfig` is a `TrainingArguments` (so `--output_dir`, `--max_steps`, `--save_steps`,
`--resume_from_checkpoint`, `accelerate launch` ... all work as usual); `PreferencePrototypeTrainer` overrides
`compute_loss` (normalised over the examples of the whole optimizer step, so gradient accumulation does not change the
update), returns the like/dislike logits from `prediction_step` (for `compute_metrics`) and tells the collator the
epoch, whose reference orders are keyed by (seed, epoch, example): a resumed run, or one on several processes, draws
the same orders as an uninterrupted single-process one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import EvalPrediction, Trainer, TrainingArguments

from imagegem_hf.distributed import CollatorEpochCallback
from imagegem_hf.hub import atomic_directory, card_license, hub_repo_id, render_card
from imagegem_hf.preference.data import PreferenceCollator, PreferenceExample
from imagegem_hf.preference.evaluate import pairwise_accuracy
from imagegem_hf.preference.losses import preference_loss
from imagegem_hf.preference.modeling_preference_prototype import PreferencePrototypeModel

MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")


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
        default=False,
        metadata={
            "help": "Load the backbone in 4 bit (NF4, bfloat16 compute; stage 1 is then QLoRA), in either stage. "
            "Needs CUDA and bitsandbytes."
        },
    )
    model_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the backbone is loaded in, in either stage: float32, bfloat16, float16 or auto (the "
            "checkpoint's). The prototypes stay float32.",
            "choices": list(MODEL_DTYPES),
        },
    )

    def __post_init__(self):
        self.remove_unused_columns = False  # rows are PreferenceExamples, collated into model inputs
        super().__post_init__()
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}.")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {MODEL_DTYPES}, got {self.model_dtype!r}.")
        if self.load_in_4bit and not torch.cuda.is_available():
            raise ValueError("load_in_4bit (QLoRA) needs a CUDA device and bitsandbytes; drop --load_in_4bit on CPU.")


def stage1_modules(model: PreferencePrototypeModel, target_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Find, from the backbone's structure, the modules stage 1 trains.

    The language model is the backbone's decoder (`get_decoder()`: LLaVA's and Qwen2-VL's `language_model`,
    Idefics2's and Idefics3's `text_model`, ...). LoRA goes on its layers whose own name is one of `target_names`; the
    vision side is every other child, with parameters, of the module that holds the language model (LLaVA:
    `vision_tower`, `multi_modal_projector`; Idefics2/3: `vision_model`, `connector`; Qwen2-VL: `visual`).

    Args:
        model: The model.
        target_names: Names of the language model's linear layers (`q_proj`, `v_proj`, ...).

    Returns:
        `(lora_targets, vision_modules)`: full module names in `model` (`backbone.model.text_model.layers.0...`).

    Raises:
        ValueError: The backbone's language model cannot be located, or has no layer named in `target_names`.

    Example:
        ```python
        >>> from imagegem_hf.preference import PreferencePrototypeModel
        >>> from imagegem_hf.preference.tiny_backbones import tiny_idefics2
        >>> model, _ = PreferencePrototypeModel.from_backbone(*tiny_idefics2(), num_prototypes=0)
        >>> targets, vision = stage1_modules(model, ["q_proj", "v_proj"])
        >>> targets[0]
        'backbone.model.text_model.layers.0.self_attn.q_proj'
        >>> vision
        ['backbone.model.vision_model', 'backbone.model.connector']
        ```
    """
    decoder = model.backbone.get_decoder()
    paths = {id(module): name for name, module in model.named_modules()}
    path = paths.get(id(decoder))
    if decoder is model.backbone or not path:
        raise ValueError(
            f"Cannot locate the language model of the {type(model.backbone).__name__} backbone (its get_decoder() "
            "returns the whole model); this backbone is not supported for stage 1."
        )
    names = set(target_names)
    targets = [f"{path}.{name}" for name, _ in decoder.named_modules() if name.rsplit(".", 1)[-1] in names]
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"The language model {path} ({type(decoder).__name__}) has no layer named one of {sorted(names)}; its "
            f"linear layers are named {linear}. Set lora_target_modules to some of those."
        )
    holder_path = path.rsplit(".", 1)[0]
    holder = model.get_submodule(holder_path)
    vision = [
        f"{holder_path}.{name}"
        for name, child in holder.named_children()
        if child is not decoder and next(child.parameters(), None) is not None
    ]
    return targets, vision


def prepare_stage1(model: PreferencePrototypeModel, args: PreferencePrototypeTrainingConfig):
    """Wrap `model` with LoRA on its language model (peft); the vision side is trained in full if requested.

    The modules come from [`stage1_modules`], by exact name.

    Returns:
        The `PeftModel`.

    Raises:
        ValueError: `args.train_vision_tower` but the backbone has no vision module beside its language model.
    """
    from peft import LoraConfig, get_peft_model

    names = [n.strip() for n in args.lora_target_modules.split(",") if n.strip()]
    targets, vision = stage1_modules(model, names)
    if args.train_vision_tower and not vision:
        raise ValueError(
            f"train_vision_tower: the {type(model.backbone).__name__} backbone has no module beside its language "
            "model; pass --train_vision_tower false."
        )
    if getattr(model.backbone, "is_loaded_in_4bit", False):  # QLoRA
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model.backbone, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=vision if args.train_vision_tower else None,  # trained in full, saved with the adapter
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


def preference_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` of [`PreferencePrototypeTrainer`]: pairwise top-1 accuracy of the validation examples (the
    liked target scored above the disliked one by `P(like)`, ties ½).

    Args:
        eval_prediction: `predictions` of shape `(examples, 2, 2)`: per example the `[M⁺, M⁻]` logits of its liked
            and of its disliked target (what `PreferencePrototypeTrainer.prediction_step` returns).

    Example:
        ```python
        >>> import numpy as np
        >>> from transformers import EvalPrediction
        >>> logits = np.array([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 0.0]]])
        >>> preference_metrics(EvalPrediction(predictions=logits, label_ids=None))
        {'pairwise_accuracy': 0.5}
        ```
    """
    logits = np.asarray(eval_prediction.predictions, dtype=np.float64)
    margin = logits[..., 0] - logits[..., 1]  # P(like) = σ(M⁺ − M⁻), monotone in the margin
    return {"pairwise_accuracy": pairwise_accuracy(margin[:, 0], margin[:, 1], np.ones(len(margin)))}


class PreferencePrototypeTrainer(Trainer):
    """`Trainer` with paper 003's loss: each batch scores the liked and the disliked target of every example with the
    same references, and `compute_loss` returns `L_base + aux_weight · L_aux`.

    The loss is the mean over the examples of the whole optimizer step (all its accumulated micro-batches and, with
    `average_tokens_across_devices`, all processes), so `gradient_accumulation_steps` never scales the update; the
    logged `loss_base` and `loss_aux` are means over the examples of all processes. The training collator's
    `set_epoch` is called at the start of every epoch: with [`PreferenceCollator`]'s keyed reference orders, a
    resumed run and a run on several processes draw the orders of an uninterrupted single-process run. (LoRA dropout
    draws its masks per process, like any dropout: turn it off, `lora_dropout=0`, where runs must match exactly.)

    Args:
        model: The (peft-wrapped in stage 1) `PreferencePrototypeModel`.
        args: [`PreferencePrototypeTrainingConfig`].
        train_dataset: A sequence of `PreferenceExample`s.
        eval_dataset: Validation examples (the validation users, never the training set).
        data_collator: A [`PreferenceCollator`].
        eval_data_collator: The collator of the validation batches (e.g. one that does not shuffle the references,
            so that validation is deterministic and leaves the training shuffles alone); default `data_collator`.
        **kwargs: Other `Trainer` arguments (`compute_metrics=preference_metrics`, `callbacks`, ...).

    Example:
        ```python
        >>> trainer = PreferencePrototypeTrainer(model=model, args=args, train_dataset=train,
        ...                                      data_collator=collator)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        ```
    """

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(CollatorEpochCallback(self.data_collator))
        self._part_sums: dict[str, float] = {}
        self._part_examples = 0

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        half = labels.shape[0] // 2
        if half == 0 or not bool(labels[:half].all()) or bool(labels[half:].any()):
            raise ValueError("Batches must hold the liked targets then the disliked ones (use PreferenceCollator).")
        outputs = model(**inputs)
        parts = preference_loss(outputs.logits[:half], outputs.logits[half:], aux_weight=self.args.aux_weight)
        loss = parts["loss"]
        if num_items_in_batch is not None:
            # `num_items_in_batch` counts the labels (two per example) of all micro-batches of this optimizer step,
            # over all processes with `average_tokens_across_devices`: weigh this micro-batch's mean by its share
            # of those examples, so that the accumulated gradient is that of the step's mean loss; the Trainer then
            # does not divide by the accumulation steps, and DDP's mean over processes is undone
            loss = loss * half / (num_items_in_batch / 2)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        if model.training:
            for key in ("base", "aux"):
                self._part_sums[key] = self._part_sums.get(key, 0.0) + float(parts[key].detach()) * half
            self._part_examples += half
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss and, unless `prediction_loss_only`, the logits `(B, 2, 2)` (per example those of its liked and
        of its disliked target) with labels `(B, 2)` (`[1, 0]`)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, dict(inputs), return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        half = outputs.logits.shape[0] // 2
        logits = torch.stack([outputs.logits[:half], outputs.logits[half:]], dim=1).detach()
        labels = torch.tensor([[1, 0]] * half, device=logits.device)
        return loss.detach(), logits, labels

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._part_examples:  # the loss parts, averaged like the loss since the last log
            # every process logs (the Trainer gathers the loss in the same call): sum the parts over processes
            keys = sorted(self._part_sums)
            sums = torch.tensor([self._part_sums[k] for k in keys] + [self._part_examples], dtype=torch.float64)
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum").tolist()
            logs = {**logs, **{f"loss_{k}": v / sums[-1] for k, v in zip(keys, sums, strict=False)}}
            self._part_sums, self._part_examples = {}, 0
        super().log(logs, *args, **kwargs)


def train_preference_model(
    model: PreferencePrototypeModel | str | os.PathLike,
    processor,
    train_examples: Sequence[PreferenceExample],
    load_image: Callable[[str], Image.Image],
    args: PreferencePrototypeTrainingConfig,
    eval_examples: Sequence[PreferenceExample] | None = None,
    resume_from_checkpoint: str | bool | None = None,
    dataset: str | os.PathLike | None = None,
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
        args: The training configuration (stage 2 loads the stage-1 folder with `args.model_dtype` and
            `args.load_in_4bit`).
        eval_examples: Validation examples, scored with their references in their stored order every
            `args.eval_steps` (with `args.eval_strategy="steps"`) and once at the end: the loss and the pairwise
            accuracy (`eval_loss`, `eval_pairwise_accuracy`); the final ones are written to the model card.
        resume_from_checkpoint: Passed to `Trainer.train` (a checkpoint folder, or True for the latest).
        dataset: The training dataset's folder or Hub repo id, for the model card's `datasets`.

    Returns:
        The trained `PreferencePrototypeModel` (LoRA merged).

    Example:
        ```python
        >>> stage1 = train_preference_model(model, processor, train, images.__getitem__, args1)  # doctest: +SKIP
        >>> stage2 = train_preference_model("out/s1/model", processor, train, images.get, args2)  # doctest: +SKIP
        ```
    """
    from transformers import set_seed

    from imagegem_hf.preference.sequence import PreferenceSequenceBuilder

    # The new weights (stage 1's LoRA, stage 2's prototypes) are drawn here, before the Trainer seeds itself: seed
    # them from `args.seed` too, so a run does not depend on what the process drew before it.
    set_seed(args.seed)
    if not isinstance(model, PreferencePrototypeModel):
        overrides = {"num_prototypes": args.num_prototypes} if args.stage == 2 else {}
        model = PreferencePrototypeModel.from_pretrained(model, **overrides, **backbone_load_kwargs(args))
    elif args.stage == 2 and model.prototypes is None:
        raise ValueError("Stage 2 from an in-memory model needs prototypes; pass the stage-1 folder instead.")
    builder = PreferenceSequenceBuilder.from_config(processor, model.config)
    # The shared-prefix batch reuses a KV cache, which activation checkpointing disables: with checkpointing on,
    # each target is scored on its full sequence instead (same logits, more compute, far less activation memory).
    collators = [
        PreferenceCollator(
            builder,
            load_image,
            n_ref=args.n_ref,
            shuffle_references=shuffle,
            seed=args.seed,
            share_prefix=not args.activation_checkpointing,
        )
        for shuffle in (args.shuffle_references, False)  # training; validation in the stored order
    ]
    trainable = prepare_stage1(model, args) if args.stage == 1 else prepare_stage2(model)
    trainer = PreferencePrototypeTrainer(
        model=trainable,
        args=args,
        train_dataset=train_examples,  # a lazy PreferenceSplit stays lazy (Trainer needs only len and indexing)
        eval_dataset=eval_examples if eval_examples else None,
        data_collator=collators[0],
        eval_data_collator=collators[1],
        compute_metrics=preference_metrics,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics = {}
    if eval_examples and args.eval_strategy != "no":  # the final model's validation (reused if just computed)
        last = next((log for log in reversed(trainer.state.log_history) if "eval_loss" in log), {})
        if last.get("step") != trainer.state.global_step:
            last = trainer.evaluate()
        metrics = {k: round(v, 4) for k, v in last.items() if k in ("eval_loss", "eval_pairwise_accuracy")}
    trained = trainable.merge_and_unload() if args.stage == 1 else trainable
    trained.eval()
    if trainer.is_world_process_zero():
        folder = Path(args.output_dir) / "model"
        save_preference_model(
            trained, processor, folder, stage=args.stage, metrics=metrics, overwrite=True, dataset=dataset
        )
    return trained


def backbone_load_kwargs(args: PreferencePrototypeTrainingConfig) -> dict:
    """`from_pretrained` keyword arguments of either stage: `dtype` from `args.model_dtype` and, with
    `args.load_in_4bit`, an NF4 `BitsAndBytesConfig` with bfloat16 compute.

    Example:
        ```python
        >>> args = PreferencePrototypeTrainingConfig(output_dir="out", model_dtype="bfloat16", report_to="none")
        >>> backbone_load_kwargs(args)
        {'dtype': torch.bfloat16}
        ```
    """
    kwargs = {"dtype": args.model_dtype if args.model_dtype == "auto" else getattr(torch, args.model_dtype)}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    return kwargs


def save_preference_model(
    model: PreferencePrototypeModel,
    processor,
    output_dir: str | os.PathLike,
    stage: int | None = None,
    metrics: dict[str, float] | None = None,
    overwrite: bool = False,
    dataset: str | os.PathLike | None = None,
) -> Path:
    """Save the model (safetensors + config), its processor and a model card into `output_dir`, atomically.

    The card's `base_model` is the backbone the model was built from (`config.backbone_config._name_or_path`, the
    path or repo id it was loaded from; a repo id only), with that model's license; `datasets` lists `dataset`
    when it is a Hub repo id.

    Example:
        ```python
        >>> save_preference_model(model, processor, "out/preference-model")  # doctest: +SKIP
        ```
    """
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        config = {k: v for k, v in model.config.to_dict().items() if k != "backbone_config"}
        base_path = model.config.backbone_config._name_or_path or None
        card = render_card(
            "preference_card.md",
            kind="model",
            base_model=hub_repo_id(base_path),
            base_path=base_path,
            license=card_license(base_path),
            datasets=[repo for repo in [hub_repo_id(dataset)] if repo],
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

    Stage 1 loads `model_name_or_path` as an `AutoModelForImageTextToText` with its processor and wraps it without
    prototypes; stage 2 loads the stage-1 model folder. Both load the backbone in `args.model_dtype` (4 bit with
    `args.load_in_4bit`). Validation runs on the validation users as `args.eval_strategy` says.

    Raises:
        ValueError: The dataset has no images, no train split, or no validation examples while
            `args.eval_strategy` asks for validation.

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
    if args.eval_strategy != "no" and not splits.get("validation"):
        raise ValueError(
            f"{dataset} has no validation examples but eval_strategy is {args.eval_strategy!r}; build the dataset "
            "with validation users, or turn validation off (eval_strategy='no'; `imagegem preference train "
            "--eval-steps 0`)."
        )
    model_dir = resolve(model_name_or_path)
    processor = AutoProcessor.from_pretrained(model_dir)
    if args.stage == 1:
        backbone = AutoModelForImageTextToText.from_pretrained(model_dir, **backbone_load_kwargs(args))
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
        dataset=dataset,
    )
    return Path(args.output_dir) / "model"
