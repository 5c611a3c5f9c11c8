"""`DiffusionDPOTrainer`: Diffusion-DPO for SD 1.5 and SDXL pipelines as a `transformers.Trainer`.

Paper: Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization",
https://huggingface.co/papers/2311.12908. ImageGem (§4.1) trains it on pairs mined from in-the-wild reactions.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from imagegem_hf.distributed import CollatorEpochCallback
from imagegem_hf.dpo.config import DiffusionDPOConfig
from imagegem_hf.dpo.data import DiffusionDPOCollator, prepare_dpo_dataset
from imagegem_hf.dpo.modeling import DiffusionDPOModel
from imagegem_hf.hub import card_license, hub_repo_id, read_json, render_card, write_json

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DPO_CONFIG_NAME = "diffusion_dpo.json"


def base_fingerprint(unet) -> dict[str, Any]:
    """What a LoRA depends on in its base UNet: enough to refuse loading it into another architecture."""
    config = unet.config
    return {
        "cross_attention_dim": config.cross_attention_dim,
        "block_out_channels": list(config.block_out_channels),
        "addition_embed_type": config.addition_embed_type,
        "in_channels": config.in_channels,
    }


def check_base_model(checkpoint_dir: str | os.PathLike, unet) -> dict[str, Any]:
    """Read `diffusion_dpo.json` of a saved run and raise if it was trained on a different base architecture."""
    path = Path(checkpoint_dir) / DPO_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no {DPO_CONFIG_NAME}: not a DiffusionDPOTrainer output.")
    saved = read_json(path)
    expected = base_fingerprint(unet)
    if saved["base"] != expected:
        raise ValueError(
            f"{checkpoint_dir} was trained for another base model ({saved['base']}) than this pipeline's UNet "
            f"({expected}); load it into the base it was trained from (saved base: {saved.get('base_model')!r})."
        )
    return saved


def load_dpo_weights(pipeline, checkpoint_dir: str | os.PathLike) -> None:
    """Load a `DiffusionDPOTrainer` output into `pipeline` (a LoRA via `load_lora_weights`, or the full UNet),
    after checking that it was trained on the same base architecture.

    Example:
        ```python
        >>> from diffusers import StableDiffusionPipeline
        >>> pipe = StableDiffusionPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5"
        ... )  # doctest: +SKIP
        >>> load_dpo_weights(pipe, "dpo-sd15/checkpoint-2000")  # doctest: +SKIP
        ```
    """
    saved = check_base_model(checkpoint_dir, pipeline.unet)
    if saved["mode"] == "lora":
        pipeline.load_lora_weights(str(checkpoint_dir), weight_name=LORA_WEIGHTS_NAME)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(checkpoint_dir) / "unet")
        pipeline.unet.load_state_dict(unet.state_dict())


def _copy(module: torch.nn.Module | None, dtype: torch.dtype) -> torch.nn.Module | None:
    """A copy of `module` in `dtype`: the trainer moves, casts and freezes its own modules, never the caller's."""
    if module is None:
        return None
    module = copy.deepcopy(module)
    return module if module.dtype == dtype else module.to(dtype=dtype)


class DiffusionDPOTrainer(Trainer):
    """Diffusion-DPO on a Stable Diffusion 1.5 or SDXL pipeline (https://huggingface.co/papers/2311.12908).

    The trained model is the pipeline's UNet: a peft LoRA on it (`mode="lora"`, reference = the same UNet with
    adapters disabled) or all its weights (`mode="full"`, reference = a frozen copy). VAE and text encoder(s) stay
    frozen, in the mixed-precision dtype (the VAE stays in float32 under `fp16=True`, as in the diffusers SDXL
    script: fp16 VAEs overflow into NaN losses). Each step draws one noise and one timestep per pair, shared by
    winner and loser, and minimises `−log σ(−½β·((mse_w − mse_l) − (ref_w − ref_l)))`; `rewards/accuracies` (the
    implicit accuracy) and `rewards/margins` are logged, averaged over the global batch. Every random draw of a pair
    (empty prompt, crop, flip, VAE sample, noise, timestep) is keyed by `args.seed`, the epoch and the pair, so a
    run on several processes (`accelerate launch`, `torchrun`) trains like one process with the same global batch,
    and resumes like the uninterrupted run. Evaluation is deterministic: each evaluation draws the same noise and
    timesteps and uses no augmentation (no empty prompts, center crops, no flips).
    Checkpoints hold the LoRA in diffusers format with its adapter config (`pytorch_lora_weights.safetensors`,
    loadable with `pipeline.load_lora_weights(dir)`, alpha included) or the full UNet (`unet/`), plus
    `diffusion_dpo.json`; training resumes from them exactly with `trainer.train(resume_from_checkpoint=...)`, and
    `load_best_model_at_end=True` loads the best one.

    Args:
        pipeline: A `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (the base model). It is not modified:
            the trainer works on copies of its UNet, VAE and text encoder(s) (so, until they move to the
            accelerator, they take the pipeline's memory once more), and `trainer.pipeline` is the trained pipeline
            built from them.
        args: A [`DiffusionDPOConfig`].
        train_dataset: Pairs in the exchange format (`jpg_0, jpg_1, label_0, caption`), ImageGem's
            `preference_pairs` with pixels or the prepared layout (`caption, image_w, image_l`), a
            `datasets.Dataset` or a streaming `datasets.IterableDataset`; validated by [`prepare_dpo_dataset`]
            (drop counts in `dropped_pairs`).
        eval_dataset: Optional pairs in the same layouts (evaluation reports the DPO loss and implicit accuracy).
        data_collator: Default: a [`DiffusionDPOCollator`] built from the pipeline's tokenizers and `args`.
        callbacks: `transformers` trainer callbacks.

    Example:
        ```python
        >>> from datasets import load_dataset
        >>> from diffusers import StableDiffusionPipeline
        >>> from imagegem_hf.dpo import DiffusionDPOConfig, DiffusionDPOTrainer
        >>> pipe = StableDiffusionPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5"
        ... )  # doctest: +SKIP
        >>> pairs = load_dataset("org/imagegem-pairs-dogs", split="train")  # doctest: +SKIP
        >>> args = DiffusionDPOConfig("dpo-sd15", per_device_train_batch_size=1, gradient_accumulation_steps=128,
        ...                           max_steps=2000, bf16=True)  # doctest: +SKIP
        >>> DiffusionDPOTrainer(pipe, args, train_dataset=pairs).train()  # doctest: +SKIP
        ```
    """

    def __init__(
        self,
        pipeline,
        args: DiffusionDPOConfig,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        callbacks=None,
    ):
        from diffusers import DDPMScheduler

        if not isinstance(args, DiffusionDPOConfig):
            raise TypeError(f"args must be a DiffusionDPOConfig, got {type(args).__name__}.")
        self.dropped_pairs: dict[str, int] = {}
        train_dataset = self._prepared(train_dataset, "train")
        eval_dataset = self._prepared(eval_dataset, "eval")
        # Frozen weights run in the mixed-precision dtype (half the memory); trained weights stay in float32.
        frozen_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        vae_dtype = torch.float32 if args.fp16 else frozen_dtype
        reference_unet = None
        if args.mode == "lora":
            from peft import LoraConfig
            from transformers import set_seed

            set_seed(args.seed)  # the adapter is drawn before Trainer seeds itself: from the run's seed too
            unet = _copy(pipeline.unet, frozen_dtype)
            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(
                    r=args.lora_rank,
                    lora_alpha=args.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(args.lora_target_modules),
                )
            )
            for param in unet.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            if pipeline.unet.dtype != torch.float32:
                raise ValueError(
                    f"Full fine-tuning needs the UNet in float32 (got {pipeline.unet.dtype}); mixed precision comes "
                    "from bf16=True / fp16=True."
                )
            unet = _copy(pipeline.unet, torch.float32)
            unet.requires_grad_(True)
            reference_unet = _copy(pipeline.unet, frozen_dtype)
        frozen = {"vae": _copy(pipeline.vae, vae_dtype), "text_encoder": _copy(pipeline.text_encoder, frozen_dtype)}
        if getattr(pipeline, "text_encoder_2", None) is not None:
            frozen["text_encoder_2"] = _copy(pipeline.text_encoder_2, frozen_dtype)
        self.pipeline = copy.copy(pipeline)
        self.pipeline.register_modules(unet=unet, **frozen)
        model = DiffusionDPOModel(
            unet,
            frozen["vae"],
            frozen["text_encoder"],
            DDPMScheduler.from_config(pipeline.scheduler.config),
            beta=args.beta_dpo,
            text_encoder_2=frozen.get("text_encoder_2"),
            reference_unet=reference_unet,
        )
        if data_collator is None:
            data_collator = DiffusionDPOCollator(
                pipeline.tokenizer,
                resolution=args.resolution,
                tokenizer_2=getattr(pipeline, "tokenizer_2", None),
                proportion_empty_prompts=args.proportion_empty_prompts,
                random_crop=args.random_crop,
                random_flip=args.random_flip,
                seed=args.seed,
            )
        callbacks = list(callbacks or [])
        if hasattr(data_collator, "set_epoch"):
            callbacks.append(CollatorEpochCallback(data_collator))
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
        )

    def _prepared(self, dataset, split: str):
        if dataset is None:
            return None
        prepared, dropped = prepare_dpo_dataset(dataset)
        if dropped:
            self.dropped_pairs[split] = dropped
        return prepared

    def get_eval_dataloader(self, eval_dataset=None):
        """The evaluation DataLoader, batched by the collator without its augmentation and at a fixed epoch (every
        evaluation gets the same batches, noise and timesteps)."""
        collator = self.data_collator
        if isinstance(collator, DiffusionDPOCollator):
            self.data_collator = collator.without_augmentation()
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Diffusion-DPO loss is {loss.item()} at step {self.state.global_step}: lower the learning rate or "
                "beta_dpo, or train in fp32/bf16 instead of fp16."
            )
        split = "train" if model.training else "eval"
        beta = self.args.beta_dpo
        terms = {
            "rewards/chosen": -0.5 * beta * (outputs.model_mse_w - outputs.ref_mse_w),
            "rewards/rejected": -0.5 * beta * (outputs.model_mse_l - outputs.ref_mse_l),
            "rewards/margins": outputs.inside,
            "rewards/accuracies": (outputs.inside > 0).float(),
            "mse/model_chosen": outputs.model_mse_w,
            "mse/model_rejected": outputs.model_mse_l,
        }
        # One gather and one host sync per step for all the logged terms.
        means = self.accelerator.gather_for_metrics(torch.stack(list(terms.values()), dim=-1)).mean(dim=0).tolist()
        for name, value in zip(terms, means, strict=True):
            self._metrics[split][name].append(value)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._metrics[split].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._metrics[split].clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir or self.args.output_dir)
        if not self.args.should_save:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        unet = self.accelerator.unwrap_model(self.model).unet
        if self.args.mode == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            # The adapter config (alpha above all) is what `load_lora_weights` reads to rebuild the same LoRA.
            type(self.pipeline).save_lora_weights(
                output_dir,
                unet_lora_layers=lora_layers,
                weight_name=LORA_WEIGHTS_NAME,
                safe_serialization=True,
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            )
        else:
            unet.save_pretrained(output_dir / "unet", safe_serialization=True)
        write_json(
            output_dir / DPO_CONFIG_NAME,
            {
                "mode": self.args.mode,
                "beta_dpo": self.args.beta_dpo,
                "lora_rank": self.args.lora_rank if self.args.mode == "lora" else None,
                "lora_alpha": self.args.lora_alpha if self.args.mode == "lora" else None,
                "resolution": self.args.resolution,
                "pipeline_class": type(self.pipeline).__name__,
                "base_model": getattr(self.pipeline, "name_or_path", None),
                "base": base_fingerprint(unet),
                "dropped_pairs": self.dropped_pairs,
            },
        )
        (output_dir / "training_args.json").write_text(self.args.to_json_string())
        (output_dir / "README.md").write_text(self.model_card(), encoding="utf-8")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        check_base_model(resume_from_checkpoint, model.unet)
        if self.args.mode == "lora":
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft import set_peft_model_state_dict

            state_dict, _ = type(self.pipeline).lora_state_dict(resume_from_checkpoint, weight_name=LORA_WEIGHTS_NAME)
            unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
            result = set_peft_model_state_dict(model.unet, convert_unet_state_dict_to_peft(unet_state))
            if result.unexpected_keys:
                keys = result.unexpected_keys[:5]
                raise ValueError(f"Checkpoint {resume_from_checkpoint} has LoRA keys this UNet lacks: {keys}.")
        else:
            from diffusers import UNet2DConditionModel

            saved = UNet2DConditionModel.from_pretrained(Path(resume_from_checkpoint) / "unet")
            model.unet.load_state_dict(saved.state_dict())

    def _load_best_model(self) -> None:
        """`load_best_model_at_end=True`: load the best checkpoint's weights (saved in this trainer's layout)."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def model_card(self, model_name: str | None = None) -> str:
        """The model card of the trained weights: diffusers' LoRA card metadata (`base_model` from the base
        pipeline's path or repo id, `library_name: diffusers`, the base's license, text-to-image / lora tags) and a
        usage snippet for the saved folder."""
        from diffusers import StableDiffusionXLPipeline

        base_path = getattr(self.pipeline, "name_or_path", None) or None
        return render_card(
            "dpo_lora_card.md",
            model_name=model_name or Path(self.args.output_dir).name,
            base_model=hub_repo_id(base_path),
            base_path=base_path,
            license=card_license(base_path),
            datasets=[repo for repo in [hub_repo_id(self.args.dataset_name)] if repo],
            sdxl=isinstance(self.pipeline, StableDiffusionXLPipeline),
            example_prompt="a photo of a dog",
            pipeline_class=type(self.pipeline).__name__,
            mode=self.args.mode,
            beta_dpo=self.args.beta_dpo,
            lora_rank=self.args.lora_rank,
            learning_rate=self.args.learning_rate,
            max_steps=self.state.global_step,
            effective_batch=self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * self.args.world_size,
            dropped_pairs=self.dropped_pairs,
        )

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        """Write `model_card()` to `args.output_dir/README.md` (every `save_model` also writes it beside the
        weights)."""
        if not self.is_world_process_zero():
            return
        Path(self.args.output_dir, "README.md").write_text(self.model_card(model_name), encoding="utf-8")
