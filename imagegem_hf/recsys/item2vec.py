"""Item2Vec (Barkan & Koenigstein 2016): skip-gram with negative sampling over user sequences."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from imagegem_hf.recsys.base import Recommender, set_seed
from imagegem_hf.recsys.data import InteractionData


def _history_mean(vectors: np.ndarray, history, users: np.ndarray) -> np.ndarray:
    matrix = history.csr()[users]
    counts = np.maximum(np.asarray(matrix.sum(axis=1)).ravel(), 1.0)
    return np.asarray(matrix @ vectors) / counts[:, None]


class Item2Vec(Recommender):
    """Skip-gram with negative sampling over each user's time-ordered items; a user is the mean of their items.

    Negative sampling makes item similarities approximate pointwise mutual information, which carries no
    popularity; the next-item score adds the log prior back: `cos(user, item) / temperature + log(count + 1)`,
    i.e. log P(item | history) up to a constant under the skip-gram model.

    Args:
        dim: Embedding size.
        window: Context window within a user's sequence.
        negatives: Negative samples per positive pair (drawn from the unigram^0.75 distribution).
        epochs: Passes over the pairs.
        batch_size: Pairs per step.
        lr: Sparse Adam learning rate.
        temperature: Temperature of the cosine similarity in the score (lower trusts the embedding more).
        seed: Seed.

    Example:
        ```python
        >>> from imagegem_hf.recsys import Item2Vec
        >>> model = Item2Vec(dim=32, epochs=5).fit(train)  # doctest: +SKIP
        ```
    """

    name = "item2vec"
    config_keys = ("dim", "window", "negatives", "epochs", "batch_size", "lr", "temperature", "seed")

    def __init__(
        self,
        dim: int = 64,
        window: int = 3,
        negatives: int = 5,
        epochs: int = 5,
        batch_size: int = 1024,
        lr: float = 1e-2,
        temperature: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.window, self.negatives, self.epochs = dim, window, negatives, epochs
        self.batch_size, self.lr, self.temperature, self.seed = batch_size, lr, temperature, seed

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

    def fit(self, train: InteractionData) -> Item2Vec:
        self._remember(train)
        rng = set_seed(self.seed)
        pairs = torch.from_numpy(self._pairs(train))
        noise = torch.from_numpy(np.bincount(train.item_index, minlength=train.n_items) ** 0.75 + 1e-3)
        center = torch.nn.Embedding(train.n_items, self.dim, sparse=True)
        context = torch.nn.Embedding(train.n_items, self.dim, sparse=True)
        torch.nn.init.normal_(center.weight, std=0.1)
        torch.nn.init.zeros_(context.weight)
        # Sparse updates: dense Adam would keep moving every row through its momentum, even rows not in the batch.
        optimizer = torch.optim.SparseAdam([*center.parameters(), *context.parameters()], lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        for _ in tqdm(range(self.epochs), desc="item2vec", leave=False):
            order = torch.from_numpy(rng.permutation(len(pairs)))
            for start in range(0, len(pairs), self.batch_size):
                batch = pairs[order[start : start + self.batch_size]]
                c, o = center(batch[:, 0]), context(batch[:, 1])
                neg = context(
                    torch.multinomial(noise, len(batch) * self.negatives, True, generator=generator).view(
                        len(batch), self.negatives
                    )
                )
                loss = -F.logsigmoid((c * o).sum(-1)).mean() - F.logsigmoid(-(neg @ c.unsqueeze(-1))).sum(1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        vectors = center.weight.detach().numpy().astype(np.float32)
        self.item_vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # cosine
        self.log_prior = np.log(np.bincount(train.item_index, minlength=train.n_items) + 1.0).astype(np.float32)
        return self

    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        self._check_fitted()
        similarity = _history_mean(self.item_vectors, history or self.train, users) @ self.item_vectors.T
        return similarity / self.temperature + self.log_prior

    def state(self) -> dict[str, np.ndarray]:
        return {"item_vectors": self.item_vectors, "log_prior": self.log_prior}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.item_vectors, self.log_prior = state["item_vectors"], state["log_prior"]
