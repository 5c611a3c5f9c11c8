"""What every recommender shares: scoring in batches, top-k, and Hub-shaped save/load."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from imagegem_hf.hub import atomic_directory, push_folder, read_json, render_card, resolve, write_json
from imagegem_hf.recsys.data import InteractionData
from imagegem_hf.recsys.metrics import metrics_from_ranks, target_ranks


class Recommender:
    """Base class: `fit(train, validation=None)`, `score(users)`, `recommend(users, k)`, `save_pretrained` /
    `from_pretrained`.

    Subclasses set `name`, implement `fit` and `score`, list their hyper-parameters in `config_keys` and their
    learned arrays in `state()` / `load_state()`. Every `fit` takes the same arguments, so that an evaluation loop
    treats all models alike: models that train iteratively early-stop on `validation`, the others ignore it.
    """

    name: ClassVar[str] = "recommender"
    config_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.item_ids: np.ndarray | None = None
        self.user_ids: np.ndarray | None = None
        self.train: InteractionData | None = None

    # -- to implement -------------------------------------------------------------------------------------------
    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> Recommender:
        """Fit on `train`; `validation` (next items after `train`, same vocabulary) is used by models that need it."""
        raise NotImplementedError

    def score(self, users: np.ndarray) -> np.ndarray:
        """(len(users), n_items) scores for user indices of the training vocabulary."""
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        del state

    # -- shared -------------------------------------------------------------------------------------------------
    def _remember(self, train: InteractionData) -> None:
        self.train, self.item_ids, self.user_ids = train, train.item_ids, train.user_ids

    def _check_fitted(self) -> None:
        if self.item_ids is None:
            raise ValueError(f"{type(self).__name__} is not fitted; call fit(train) or from_pretrained first.")

    def recommend(self, users: np.ndarray, k: int = 10, exclude_seen: bool = True) -> np.ndarray:
        """Top-`k` item indices per user (ties broken by lower item index), seen train items masked."""
        self._check_fitted()
        if k > len(self.item_ids):
            raise ValueError(f"k={k} is larger than the catalogue ({len(self.item_ids)} items).")
        scores = np.asarray(self.score(np.asarray(users)), dtype=np.float64)
        if exclude_seen and self.train is not None:
            seen = self.train.csr()[np.asarray(users)].tocoo()
            scores[seen.row, seen.col] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.lexsort((top, -np.take_along_axis(scores, top, 1)), axis=1)
        return np.take_along_axis(top, order, 1)

    def validation_ndcg(self, validation: InteractionData) -> float:
        """NDCG@10 of `validation`'s items given the training history (full ranking, seen items masked)."""
        users = validation.user_index
        ranks = target_ranks(self.score(users), validation.item_index, self.train.csr()[users])
        return metrics_from_ranks(ranks, ks=(10,))["ndcg@10"]

    def check_vocabulary(self, data: InteractionData) -> None:
        """Raise if `data` does not use this model's item vocabulary (ids at the same indices)."""
        self._check_fitted()
        if len(data.item_ids) != len(self.item_ids) or not np.array_equal(data.item_ids, self.item_ids):
            raise ValueError(
                f"Item vocabulary mismatch: the model knows {len(self.item_ids)} items, the data has "
                f"{len(data.item_ids)} (or other ids). Evaluate on splits of the data the model was trained on."
            )

    def config(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.config_keys}

    def save_pretrained(
        self, save_directory: str | os.PathLike, overwrite: bool = True, metrics: dict[str, float] | None = None
    ) -> Path:
        """Write `config.json`, `model.safetensors` (learned arrays + train matrix), `vocab.json` and a card."""
        self._check_fitted()
        state = dict(self.state())
        if self.train is not None:
            state |= {
                "train.user_index": self.train.user_index,
                "train.item_index": self.train.item_index,
                "train.timestamp": self.train.timestamp.astype(np.int64),
            }
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            write_json(tmp / "config.json", {"model_type": self.name, **self.config()})
            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "model.safetensors"))
            (tmp / "vocab.json").write_text(
                json.dumps({"item_ids": self.item_ids.tolist(), "user_ids": self.user_ids.tolist()})
            )
            (tmp / "README.md").write_text(
                render_card(
                    "recommender_card.md",
                    model_name=type(self).__name__,
                    config=self.config(),
                    metrics=metrics or {},
                    n_items=len(self.item_ids),
                    n_users=len(self.user_ids),
                )
            )
        return Path(save_directory)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike) -> Recommender:
        """Load a recommender saved by `save_pretrained` (local folder or Hub repo id)."""
        from imagegem_hf.recsys.registry import MODELS

        folder = resolve(path_or_repo_id)
        config = read_json(folder / "config.json")
        model_type = config.pop("model_type", None)
        if model_type not in MODELS:
            raise ValueError(f"{folder} holds an unknown model_type {model_type!r}; expected one of {sorted(MODELS)}.")
        klass = MODELS[model_type]
        if cls is not Recommender and klass is not cls:
            raise ValueError(f"{folder} holds a {klass.__name__}, not a {cls.__name__}.")
        model = klass(**config)
        vocab = json.loads((folder / "vocab.json").read_text())
        model.item_ids, model.user_ids = np.array(vocab["item_ids"]), np.array(vocab["user_ids"])
        state = load_file(str(folder / "model.safetensors"))
        if "train.user_index" in state:
            model.train = InteractionData(
                state.pop("train.user_index"),
                state.pop("train.item_index"),
                state.pop("train.timestamp"),
                model.user_ids,
                model.item_ids,
            )
        model.load_state(state)
        return model

    def push_to_hub(self, repo_id: str, private: bool = False) -> str:
        """Save to a temporary folder and upload it to `repo_id`."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return push_folder(folder, repo_id, private=private)


def set_seed(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
