"""Two-Tower retrieval with sampling-bias-corrected in-batch softmax (Yi et al. 2019, logQ correction)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from imagegem_hf.recsys.base import Recommender, set_seed
from imagegem_hf.recsys.data import InteractionData
from imagegem_hf.recsys.item2vec import _history_mean
from imagegem_hf.recsys.training import ScheduledTraining, endless_batches, run_schedule, validation_sample


class TwoTower(ScheduledTraining, Recommender):
    """User tower = MLP(mean of the user's item embeddings); item tower = MLP(item embedding).

    Trained on (history, next item) examples with in-batch negatives; each logit is corrected by −log q(item),
    q the item's frequency in the training stream, so popular items are not over-penalised as negatives.
    Item embeddings can start from precomputed content vectors (e.g. CLIP image embeddings of the items, as the
    paper's Table 5 initialises them from a pre-trained ViT).

    Training follows `imagegem_hf.recsys.training`: a step budget of `budget_epochs` epochs (at least `min_steps`
    steps), linear warmup, and early stopping on validation NDCG@10 when `fit` gets validation data.

    Args:
        dim: Output embedding size.
        batch_size: Examples per step (= in-batch negatives + 1).
        lr: Adam learning rate (after warmup).
        temperature: Softmax temperature on cosine logits.
        item_features: Content vectors that initialise the item embeddings (projected to `dim`): a DataFrame
            indexed by item id, one column per feature; every training item needs a row.
        max_steps: Step budget; `None` scales it to the data.
        budget_epochs: Epochs in the scaled budget.
        min_steps: Steps before early stopping may stop (and the smallest scaled budget).
        eval_every: Steps between validation evaluations; `None` is one epoch, clipped to [25, 1000].
        patience: Evaluations without a better validation NDCG@10 before stopping.
        warmup_steps: Linear learning-rate warmup steps.
        eval_users: Validation users per evaluation (a fixed random subset when there are more).
        seed: Seed.

    Example:
        ```python
        >>> from imagegem_hf.recsys import TwoTower
        >>> model = TwoTower(item_features=clip_vectors_by_item_id).fit(train, validation=val)  # doctest: +SKIP
        ```
    """

    name = "twotower"
    config_keys = ("dim", "batch_size", "lr", "temperature", *ScheduledTraining.SCHEDULE_KEYS, "seed")

    def __init__(
        self,
        dim: int = 64,
        batch_size: int = 512,
        lr: float = 3e-3,
        temperature: float = 0.1,
        item_features: pd.DataFrame | None = None,
        max_steps: int | None = None,
        budget_epochs: float = 10.0,
        min_steps: int = 500,
        eval_every: int | None = None,
        patience: int = 5,
        warmup_steps: int = 100,
        eval_users: int = 10_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.batch_size, self.lr, self.temperature = dim, batch_size, lr, temperature
        self.item_features = item_features
        self.max_steps, self.budget_epochs, self.min_steps, self.eval_every = (
            max_steps,
            budget_epochs,
            min_steps,
            eval_every,
        )
        self.patience, self.warmup_steps, self.eval_users, self.seed = patience, warmup_steps, eval_users, seed

    def _initial_embeddings(self, train: InteractionData) -> torch.Tensor:
        if self.item_features is None:
            return torch.randn(train.n_items, self.dim) * 0.1
        features = self.item_features.reindex(train.item_ids)
        missing = features.isna().any(axis=1)
        if missing.any():
            raise ValueError(
                f"item_features has no (or a partial) row for {int(missing.sum())} of {train.n_items} items, e.g. "
                f"{train.item_ids[missing.to_numpy()][:3].tolist()}; give every item a vector or drop those items."
            )
        base = torch.from_numpy(features.to_numpy(np.float32, copy=True))
        return base @ torch.randn(base.shape[1], self.dim) / base.shape[1] ** 0.5

    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> TwoTower:
        """Train on every (items before position p, item p) example of each user's sequence; early-stop on
        validation NDCG@10 when given (schedule in `schedule_`, one record per evaluation in `history_`)."""
        self._remember(train)
        rng = set_seed(self.seed)
        n = train.n_items
        network = torch.nn.Module()
        network.embedding = torch.nn.Parameter(self._initial_embeddings(train))
        network.user_tower, network.item_tower = self._tower(), self._tower()
        hist_rows, hist_cols, targets = [], [], []
        for seq in train.sequences():
            for p in range(1, len(seq)):
                example = len(targets)
                hist_rows.extend([example] * p)
                hist_cols.extend(seq[:p].tolist())
                targets.append(seq[p])
        if not targets:
            raise ValueError("TwoTower needs users with at least 2 training interactions.")
        hist = sp.csr_matrix((np.ones(len(hist_rows), np.float32), (hist_rows, hist_cols)), shape=(len(targets), n))
        hist = sp.diags(1.0 / np.maximum(np.asarray(hist.sum(1)).ravel(), 1)) @ hist
        targets = np.array(targets)
        log_q = torch.from_numpy(np.log(np.bincount(targets, minlength=n) / len(targets) + 1e-12).astype(np.float32))

        def loss_fn(idx: np.ndarray) -> torch.Tensor:
            h = hist[idx].tocoo()
            h = torch.sparse_coo_tensor(
                torch.from_numpy(np.vstack([h.row, h.col]).astype(np.int64)),
                torch.from_numpy(h.data.astype(np.float32)),
                h.shape,
                check_invariants=True,
            )
            u = F.normalize(network.user_tower(torch.sparse.mm(h, network.embedding)), dim=-1)
            t = torch.from_numpy(targets[idx])
            v = F.normalize(network.item_tower(network.embedding[t]), dim=-1)
            logits = u @ v.T / self.temperature - log_q[t][None, :]
            same = t[None, :] == t[:, None]  # the same item twice in a batch is not a negative
            logits = logits.masked_fill(same & ~torch.eye(len(t), dtype=torch.bool), float("-inf"))
            return F.cross_entropy(logits, torch.arange(len(t)))

        def validate() -> float:
            self._set_vectors(network)
            return self.validation_ndcg(val)

        self.schedule_ = self.resolve_schedule(len(targets))
        val = None if validation is None else validation_sample(validation, self.eval_users, self.seed)
        self.history_ = run_schedule(
            self.schedule_,
            network,
            torch.optim.Adam(network.parameters(), lr=self.lr),
            loss_fn,
            endless_batches(len(targets), self.batch_size, rng),
            validate=None if val is None else validate,
            desc="two-tower",
        )
        self._set_vectors(network)
        return self

    @torch.no_grad()
    def _set_vectors(self, network: torch.nn.Module) -> None:
        self.item_embeddings = network.embedding.detach().numpy().copy()
        self.item_vectors = F.normalize(network.item_tower(network.embedding), dim=-1).numpy()
        self.user_tower = copy.deepcopy(network.user_tower).eval()

    def _tower(self) -> torch.nn.Sequential:
        return torch.nn.Sequential(
            torch.nn.Linear(self.dim, self.dim), torch.nn.GELU(), torch.nn.Linear(self.dim, self.dim)
        )

    @torch.no_grad()
    def user_vectors(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        mean = torch.from_numpy(_history_mean(self.item_embeddings, history or self.train, users).astype(np.float32))
        return F.normalize(self.user_tower(mean), dim=-1).numpy()

    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        self._check_fitted()
        return self.user_vectors(users, history) @ self.item_vectors.T

    def state(self) -> dict[str, np.ndarray]:
        return {
            "item_embeddings": self.item_embeddings,
            "item_vectors": self.item_vectors,
            **{f"user_tower.{k}": v.numpy() for k, v in self.user_tower.state_dict().items()},
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.item_embeddings, self.item_vectors = state["item_embeddings"], state["item_vectors"]
        self.user_tower = self._tower().eval()
        self.user_tower.load_state_dict(
            {
                k.removeprefix("user_tower."): torch.from_numpy(v)
                for k, v in state.items()
                if k.startswith("user_tower.")
            }
        )
