"""`DiffusionDPOConfig`: the training arguments of `DiffusionDPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class DiffusionDPOConfig(TrainingArguments):
    r"""Training arguments of [`DiffusionDPOTrainer`] (Diffusion-DPO, https://huggingface.co/papers/2311.12908).

    Everything `transformers.TrainingArguments` offers (batch size, gradient accumulation, bf16/fp16, activation
    checkpointing, checkpointing and resuming, `push_to_hub`, …) applies unchanged; the fields below are specific
    to Diffusion-DPO.

    The defaults follow the diffusers Diffusion-DPO LoRA recipe (rank-8 LoRA on the attention projections,
    learning rate 1e-5); the original paper fine-tunes the full UNet (`mode="full"`) with learning rate 1e-8
    scaled by the effective batch (2048), 2000 steps and 20% empty prompts.

    Example:
        ```python
        >>> from imagegem_hf.dpo import DiffusionDPOConfig
        >>> args = DiffusionDPOConfig(output_dir="dpo-sd15", beta_dpo=5000, max_steps=2000, report_to=[])
        >>> args.mode, args.resolution
        ('lora', 512)
        ```
    """

    beta_dpo: float = field(
        default=5000.0,
        metadata={"help": "β of the Diffusion-DPO loss −log σ(−½β·(Δmodel − Δref)); 5000 for SD 1.5 in the paper."},
    )
    mode: str = field(
        default="lora",
        metadata={
            "help": "'lora': train a peft LoRA on the UNet, reference = the same UNet with adapters disabled; "
            "'full': train every UNet weight against a frozen copy."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id of the preference-pair dataset, recorded as `datasets` in the model card."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (mode='lora')."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (mode='lora'); default = lora_rank."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={"help": "UNet modules that get a LoRA (mode='lora')."},
    )
    resolution: int = field(
        default=512,
        metadata={"help": "Training resolution: images are resized (shorter side) and cropped to this square."},
    )
    random_crop: bool = field(
        default=False, metadata={"help": "Random instead of center crops (the crop offset is an SDXL condition)."}
    )
    random_flip: bool = field(
        default=True,
        metadata={
            "help": "Flip each pair (winner and loser together) horizontally with probability 0.5, as both "
            "reference Diffusion-DPO scripts do; turn off when left and right matter to the preference."
        },
    )
    proportion_empty_prompts: float = field(
        default=0.0,
        metadata={"help": "Fraction of captions replaced by the empty prompt (0.2 in the Diffusion-DPO paper)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep the pair columns for the collator (the UNet's forward does not name them)."},
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("lora", "full"):
            raise ValueError(f"mode must be 'lora' or 'full', got {self.mode!r}.")
        if self.beta_dpo <= 0:
            raise ValueError(f"beta_dpo must be positive, got {self.beta_dpo}.")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}.")
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}.")
        if self.lora_alpha is None:
            self.lora_alpha = self.lora_rank
