"""Diffusion-DPO (Wallace et al. 2024) for Stable Diffusion 1.5 and SDXL as a `transformers.Trainer`.

`DiffusionDPOConfig` + `DiffusionDPOTrainer` train a UNet (a peft LoRA or the full model) on preference pairs;
`evaluate` scores base vs tuned pipelines with PickScore, HPSv2 and CLIP score (ImageGem Table 4). Names are imported
on first use, so `import imagegem_hf.dpo` does not import torch or diffusers.
"""

from imagegem_hf._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DiffusionDPOConfig": "imagegem_hf.dpo.config",
    "DiffusionDPOCollator": "imagegem_hf.dpo.data",
    "prepare_dpo_dataset": "imagegem_hf.dpo.data",
    "DiffusionDPOModel": "imagegem_hf.dpo.modeling",
    "diffusion_dpo_loss": "imagegem_hf.dpo.modeling",
    "DiffusionDPOTrainer": "imagegem_hf.dpo.trainer",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
