"""Weights2Weights for user-made LoRAs (ImageGem §4.3, §5.3): LoRA I/O, rank-1 reduction, a PCA weight space,
preference directions and `W2WEditPipeline`, which edits a LoRA along a direction without retraining."""

from imagegem_hf.w2w.directions import Direction, debias, preference_direction
from imagegem_hf.w2w.labels import (
    PreferenceLabels,
    StyleLabelConfig,
    StyleLabels,
    VLMDescriber,
    attribute_labels,
    preference_labels,
    style_labels,
)
from imagegem_hf.w2w.lora_io import LoRA, LoRAModule, load_lora, lora_target_shapes, save_lora
from imagegem_hf.w2w.pipeline_w2w import W2WEditOutput, W2WEditPipeline
from imagegem_hf.w2w.pipeline_w2w_xl import W2WEditXLPipeline, w2w_pipeline_from_base
from imagegem_hf.w2w.reduce import rank1_reduce, reduce_rank, select_layers
from imagegem_hf.w2w.space import WeightSpace

__all__ = [
    "Direction",
    "LoRA",
    "LoRAModule",
    "PreferenceLabels",
    "StyleLabelConfig",
    "StyleLabels",
    "VLMDescriber",
    "W2WEditOutput",
    "W2WEditPipeline",
    "W2WEditXLPipeline",
    "WeightSpace",
    "attribute_labels",
    "debias",
    "load_lora",
    "lora_target_shapes",
    "preference_direction",
    "preference_labels",
    "rank1_reduce",
    "reduce_rank",
    "save_lora",
    "select_layers",
    "style_labels",
    "w2w_pipeline_from_base",
]
