"""Personal preference prediction with a VLM and learnable preference prototypes (paper 003, REFERENCE §7).

`PreferencePrototypeModel` wraps any image-text-to-text backbone; `PreferenceSequenceBuilder` turns a user's
liked/disliked references and a target image into the backbone's chat sequence; `losses`, `data`, `trainer` and
`evaluate` hold the losses, the Pick-a-Pic per-user data, two-stage training and the paper's tables.
"""

from transformers import AutoConfig, AutoModel

from imagegem_hf.preference.configuration_preference_prototype import PreferencePrototypeConfig
from imagegem_hf.preference.data import (
    PreferenceCollator,
    PreferenceExample,
    PreferenceSplit,
    build_preference_dataset,
    build_user_splits,
    group_pickapic_records,
    load_preference_dataset,
    read_processed,
    save_preference_dataset,
    synthetic_pickapic_records,
)
from imagegem_hf.preference.dataset_io import ImageStore
from imagegem_hf.preference.evaluate import PreferenceEvalResult, evaluate_preference
from imagegem_hf.preference.losses import aux_loss, base_loss, preference_loss
from imagegem_hf.preference.modeling_preference_prototype import (
    PreferencePrototypeModel,
    PreferencePrototypeOutput,
    PreferencePrototypePreTrainedModel,
)
from imagegem_hf.preference.sequence import (
    PairBatch,
    PreferenceQuery,
    PreferenceSequenceBuilder,
    ReferencePair,
    build_pair_batch,
)
from imagegem_hf.preference.trainer import (
    PreferencePrototypeTrainer,
    PreferencePrototypeTrainingConfig,
    save_preference_model,
    train_from_dataset,
    train_preference_model,
)

AutoConfig.register(PreferencePrototypeConfig.model_type, PreferencePrototypeConfig, exist_ok=True)
AutoModel.register(PreferencePrototypeConfig, PreferencePrototypeModel, exist_ok=True)

__all__ = [
    "ImageStore",
    "PairBatch",
    "PreferenceCollator",
    "PreferenceEvalResult",
    "PreferenceExample",
    "PreferencePrototypeConfig",
    "PreferencePrototypeModel",
    "PreferencePrototypeOutput",
    "PreferencePrototypePreTrainedModel",
    "PreferencePrototypeTrainer",
    "PreferencePrototypeTrainingConfig",
    "PreferenceQuery",
    "PreferenceSequenceBuilder",
    "PreferenceSplit",
    "ReferencePair",
    "aux_loss",
    "base_loss",
    "build_pair_batch",
    "build_preference_dataset",
    "build_user_splits",
    "evaluate_preference",
    "group_pickapic_records",
    "load_preference_dataset",
    "preference_loss",
    "read_processed",
    "save_preference_dataset",
    "save_preference_model",
    "synthetic_pickapic_records",
    "train_from_dataset",
    "train_preference_model",
]
