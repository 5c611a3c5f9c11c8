"""Weights2Weights for user-made LoRAs (ImageGem §4.3, §5.3): LoRA I/O, rank-1 reduction, a PCA weight space,
preference directions and `W2WEditPipeline`, which edits a LoRA along a direction without retraining. Names are
imported on first use, so `import imagegem_hf.w2w` does not import torch or diffusers."""

from imagegem_hf._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Direction": "imagegem_hf.w2w.directions",
    "debias": "imagegem_hf.w2w.directions",
    "preference_direction": "imagegem_hf.w2w.directions",
    "PreferenceLabels": "imagegem_hf.w2w.labels",
    "StyleLabelConfig": "imagegem_hf.w2w.labels",
    "StyleLabels": "imagegem_hf.w2w.labels",
    "VLMDescriber": "imagegem_hf.w2w.labels",
    "attribute_labels": "imagegem_hf.w2w.labels",
    "preference_labels": "imagegem_hf.w2w.labels",
    "style_labels": "imagegem_hf.w2w.labels",
    "LoRA": "imagegem_hf.w2w.lora_io",
    "LoRAModule": "imagegem_hf.w2w.lora_io",
    "load_lora": "imagegem_hf.w2w.lora_io",
    "lora_target_shapes": "imagegem_hf.w2w.lora_io",
    "save_lora": "imagegem_hf.w2w.lora_io",
    "W2WEditOutput": "imagegem_hf.w2w.pipeline_w2w",
    "W2WEditPipeline": "imagegem_hf.w2w.pipeline_w2w",
    "W2WEditXLPipeline": "imagegem_hf.w2w.pipeline_w2w_xl",
    "w2w_pipeline_from_base": "imagegem_hf.w2w.pipeline_w2w_xl",
    "rank1_reduce": "imagegem_hf.w2w.reduce",
    "reduce_rank": "imagegem_hf.w2w.reduce",
    "select_layers": "imagegem_hf.w2w.reduce",
    "WeightSpace": "imagegem_hf.w2w.space",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
