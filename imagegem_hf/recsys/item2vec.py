"""Item2Vec (Barkan & Koenigstein 2016): skip-gram with negative sampling over user sequences."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from imagegem_hf.recsys.base import Recommender, set_seed
from imagegem_hf.recsys.data import InteractionData
from imagegem_hf.recsys.training import ScheduledTraining, endless_batches, run_schedule, validation_sample


def _history_mean(vectors: np.ndarray, history, users: np.ndarray) -> np.ndarray:
    matrix = history.csr()[users]
    counts = np.maximum(np.asarray(matrix.sum(axis=1)).ravel(), 1.0)
    return np.asarray(matrix @ vectors) / counts[:, None]


class Item2Vec(ScheduledTraining, Recommender):
    """Skip-gram with negative sampling over each user's time-ordered items; a user is the mean of their items.

    Negative sampling makes item similarities approximate pointwise mutual information, which carries no
    popularity; the next-item score adds the log prior back: `cos(user, item) / temperature + log(count + 1)`,
    i.e. log P(item | history) up to a constant under the skip-gram model.

    Training follows `imagegem_hf.recsys.training`: a step budget of `budget_epochs` epochs over the pairs (at
    least `min_steps` steps), linear warmup, and early stopping on validation NDCG@10 when `fit` gets validation
    data.

    Args:
        dim: Embedding size.
        window: Context window within a user's sequence.
        negatives: Negative samples per positive pair (drawn from the unigram^0.75 distribution).
        batch_size: Pairs per step.
        lr: Sparse Adam learning rate (after warmup).
        temperature: Temperature of the cosine similarity in the score (lower trusts the embedding more).
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
        >>> from imagegem_hf.recsys import Item2Vec
        >>> model = Item2Vec(dim=32).fit(train, validation=val)  # doctest: +SKIP
        ```
    """

    name = "item2vec"
    config_keys = (
        "dim",
        "window",
        "negatives",
        "batch_size",
        "lr",
        "temperature",
        *ScheduledTraining.SCHEDULE_KEYS,
        "seed",
    )

    def __init__(
        self,
        dim: int = 64,
        window: int = 3,
        negatives: int = 5,
        batch_size: int = 1024,
        lr: float = 1e-2,
        temperature: float = 0.1,
        max_steps: int | None = None,
        budget_epochs: float = 5.0,
        min_steps: int = 500,
        eval_every: int | None = None,
        patience: int = 5,
        warmup_steps: int = 100,
        eval_users: int = 10_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.window, self.negatives, self.batch_size = dim, window, negatives, batch_size
        self.lr, self.temperature = lr, temperature
        self.max_steps, self.budget_epochs, self.min_steps, self.eval_every = (
            max_steps,
            budget_epochs,
            min_steps,
            eval_every,
        )
        self.patience, self.warmup_steps, self.eval_users, self.seed = patience, warmup_steps, eval_users, seed

    def _pairs(self, train: InteractionData) -> np.ndarray:
        pairs = []
        for seq in train.sequences():
            for offset in range(1, self.window + 1):
                if len(seq) > offset:
                    pairs.append(np.stack([seq[:-offset], seq[offset:]], 1))
                    pairs.append(np.stack([seq[offset:], seq[:-offset]], 1))
        if not pairs:
            raise ValueError("Item2Vec needs users with at least 2 training interactions.")
        return np.concatenate(pairs)

    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> Item2Vec:
        """Train on (item, context item) pairs within `window` of each other in a user's sequence; early-stop on
        validation NDCG@10 when given (schedule in `schedule_`, one record per evaluation in `history_`)."""
        self._remember(train)
        rng = set_seed(self.seed)
        pairs = torch.from_numpy(self._pairs(train))
        counts = np.bincount(train.item_index, minlength=train.n_items)
        noise = torch.from_numpy(counts**0.75 + 1e-3)
        self.log_prior = np.log(counts + 1.0).astype(np.float32)
        embeddings = torch.nn.ModuleDict(
            {
                "center": torch.nn.Embedding(train.n_items, self.dim, sparse=True),
                "context": torch.nn.Embedding(train.n_items, self.dim, sparse=True),
            }
        )
        torch.nn.init.normal_(embeddings["center"].weight, std=0.1)
        torch.nn.init.zeros_(embeddings["context"].weight)
        generator = torch.Generator().manual_seed(self.seed)

        def loss_fn(idx: np.ndarray) -> torch.Tensor:
            batch = pairs[idx]
            c, o = embeddings["center"](batch[:, 0]), embeddings["context"](batch[:, 1])
            sampled = torch.multinomial(noise, len(batch) * self.negatives, True, generator=generator)
            neg = embeddings["context"](sampled.view(len(batch), self.negatives))
            return -F.logsigmoid((c * o).sum(-1)).mean() - F.logsigmoid(-(neg @ c.unsqueeze(-1))).sum(1).mean()

        def validate() -> float:
            self._set_vectors(embeddings["center"].weight)
            return self.validation_ndcg(val)

        self.schedule_ = self.resolve_schedule(len(pairs))
        val = None if validation is None else validation_sample(validation, self.eval_users, self.seed)
        self.history_ = run_schedule(
            self.schedule_,
            embeddings,
            # Sparse updates: dense Adam would keep moving every row through its momentum, even rows not in the batch.
            torch.optim.SparseAdam(list(embeddings.parameters()), lr=self.lr),
            loss_fn,
            endless_batches(len(pairs), self.batch_size, rng),
            validate=None if val is None else validate,
            desc="item2vec",
        )
        self._set_vectors(embeddings["center"].weight)
        return self

    def _set_vectors(self, weight: torch.Tensor) -> None:
        vectors = weight.detach().numpy().astype(np.float32)
        self.item_vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # cosine

    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        self._check_fitted()
        similarity = _history_mean(self.item_vectors, history or self.train, users) @ self.item_vectors.T
        return similarity / self.temperature + self.log_prior

    def state(self) -> dict[str, np.ndarray]:
        return {"item_vectors": self.item_vectors, "log_prior": self.log_prior}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.item_vectors, self.log_prior = state["item_vectors"], state["log_prior"]
