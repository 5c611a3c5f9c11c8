"""Personalized retrieval and model recommendation: data, metrics, baselines, FAISS retrieval, evaluation.

Names are imported on first use, so `import imagegem_hf.recsys` does not import torch or pandas; `MODELS` maps each
recommender's `name` to its class.
"""

from imagegem_hf._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Recommender": "imagegem_hf.recsys.base",
    "InteractionData": "imagegem_hf.recsys.data",
    "Item2Vec": "imagegem_hf.recsys.item2vec",
    "ItemKNN": "imagegem_hf.recsys.knn",
    "Pop": "imagegem_hf.recsys.knn",
    "UserKNN": "imagegem_hf.recsys.knn",
    "SASRec": "imagegem_hf.recsys.sasrec",
    "TwoTower": "imagegem_hf.recsys.two_tower",
    "MODELS": "imagegem_hf.recsys.registry",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
