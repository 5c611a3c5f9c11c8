"""Diffusion-DPO (Wallace et al. 2024) for Stable Diffusion 1.5 and SDXL as a `transformers.Trainer`.

`DiffusionDPOConfig` + `DiffusionDPOTrainer` train a UNet (a peft LoRA or the full model) on preference pairs;
`evaluate` scores base vs tuned pipelines with PickScore, HPSv2 and CLIP score (ImageGem Table 4).
"""

from imagegem_hf.dpo.config import DiffusionDPOConfig
from imagegem_hf.dpo.data import DiffusionDPOCollator, prepare_dpo_dataset
from imagegem_hf.dpo.modeling import DiffusionDPOModel, diffusion_dpo_loss
from imagegem_hf.dpo.trainer import DiffusionDPOTrainer

__all__ = [
    "DiffusionDPOCollator",
    "DiffusionDPOConfig",
    "DiffusionDPOModel",
    "DiffusionDPOTrainer",
    "diffusion_dpo_loss",
    "prepare_dpo_dataset",
]
