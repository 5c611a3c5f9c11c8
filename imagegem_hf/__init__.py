"""imagegem_hf: generative model personalization on the Hugging Face stack.

Public names are imported lazily, so `import imagegem_hf` is cheap and pulling in one area (say, the
recommenders) does not import torch-heavy others (diffusers pipelines, VLMs).
"""

from __future__ import annotations

from imagegem_hf._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # hub and data
    "resolve": "imagegem_hf.hub",
    "features_for": "imagegem_hf.data.schema",
    "build_dataset": "imagegem_hf.data.build",
    "leave_one_last_split": "imagegem_hf.data.subsets",
    "make_rec_subsets": "imagegem_hf.data.subsets",
    "generate_raw_sample": "imagegem_hf.data.synth",
    # embeddings
    "SentenceTransformerEmbedder": "imagegem_hf.embeddings",
    "CLIPEmbedder": "imagegem_hf.embeddings",
    # recommendation
    "InteractionData": "imagegem_hf.recsys",
    "Pop": "imagegem_hf.recsys",
    "Recommender": "imagegem_hf.recsys",
    "ItemKNN": "imagegem_hf.recsys",
    "UserKNN": "imagegem_hf.recsys",
    "Item2Vec": "imagegem_hf.recsys",
    "TwoTower": "imagegem_hf.recsys",
    "SASRec": "imagegem_hf.recsys",
    # VLM ranking
    "VLMRankerPipeline": "imagegem_hf.ranker",
    "RankItem": "imagegem_hf.ranker",
    # reward scorers
    "PickScore": "imagegem_hf.scoring",
    "HPSv2": "imagegem_hf.scoring",
    "CLIPScore": "imagegem_hf.scoring",
    # Diffusion-DPO
    "DiffusionDPOConfig": "imagegem_hf.dpo",
    "DiffusionDPOTrainer": "imagegem_hf.dpo",
    # LoRA weight space (W2W)
    "WeightSpace": "imagegem_hf.w2w",
    "W2WEditPipeline": "imagegem_hf.w2w",
    "W2WEditXLPipeline": "imagegem_hf.w2w",
    "LoRA": "imagegem_hf.w2w",
    "load_lora": "imagegem_hf.w2w",
    "save_lora": "imagegem_hf.w2w",
    "rank1_reduce": "imagegem_hf.w2w",
    "preference_direction": "imagegem_hf.w2w",
    "debias": "imagegem_hf.w2w",
    "Direction": "imagegem_hf.w2w",
    "style_labels": "imagegem_hf.w2w",
    "preference_labels": "imagegem_hf.w2w",
    # personal preference prediction
    "PreferencePrototypeConfig": "imagegem_hf.preference",
    "PreferencePrototypeModel": "imagegem_hf.preference",
    "PreferencePrototypeTrainer": "imagegem_hf.preference",
    "PreferencePrototypeTrainingConfig": "imagegem_hf.preference",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
