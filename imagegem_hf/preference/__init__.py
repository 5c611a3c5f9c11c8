"""Personal preference prediction with a VLM and learnable preference prototypes (paper 003, REFERENCE §7).

`PreferencePrototypeModel` wraps any image-text-to-text backbone; `PreferenceSequenceBuilder` turns a user's
liked/disliked references and a target image into the backbone's chat sequence; `losses`, `data`, `trainer` and
`evaluate` hold the losses, the Pick-a-Pic per-user data, two-stage training and the paper's tables.
"""

from transformers import AutoConfig, AutoModel

from imagegem_hf.preference.configuration_preference_prototype import PreferencePrototypeConfig
from imagegem_hf.preference.modeling_preference_prototype import (
    PreferencePrototypeModel,
    PreferencePrototypeOutput,
    PreferencePrototypePreTrainedModel,
)
from imagegem_hf.preference.sequence import PreferenceQuery, PreferenceSequenceBuilder, ReferencePair

AutoConfig.register(PreferencePrototypeConfig.model_type, PreferencePrototypeConfig, exist_ok=True)
AutoModel.register(PreferencePrototypeConfig, PreferencePrototypeModel, exist_ok=True)

__all__ = [
    "PreferencePrototypeConfig",
    "PreferencePrototypeModel",
    "PreferencePrototypeOutput",
    "PreferencePrototypePreTrainedModel",
    "PreferenceQuery",
    "PreferenceSequenceBuilder",
    "ReferencePair",
]
