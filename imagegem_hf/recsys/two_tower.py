"""Two-Tower retrieval with sampling-bias-corrected in-batch softmax (Yi et al. 2019, logQ correction)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from imagegem_hf.recsys.base import Recommender, set_seed
from imagegem_hf.recsys.data import InteractionData
from imagegem_hf.recsys.item2vec import _history_mean


class TwoTower(Recommender):
    """User tower = MLP(mean of the user's item embeddings); item tower = MLP(item embedding).

    Trained on (history, next item) examples with in-batch negatives; each logit is corrected by −log q(item),
    q the item's frequency in the training stream, so popular items are not over-penalised as negatives.
    Item embeddings can start from precomputed content vectors (e.g. CLIP image embeddings of the items).

    Args:
        dim: Output embedding size.
        epochs: Training passes.
        batch_size: Examples per step (= in-batch negatives + 1).
        lr: Adam learning rate.
        temperature: Softmax temperature on cosine logits.
        seed: Seed.

    Example:
        ```python
        >>> from imagegem_hf.recsys import TwoTower
        >>> model = TwoTower().fit(train, item_features=clip_vectors)  # doctest: +SKIP
        ```
    """

    name = "twotower"
    config_keys = ("dim", "epochs", "batch_size", "lr", "temperature", "seed")

    def __init__(
        self,
        dim: int = 64,
        epochs: int = 10,
        batch_size: int = 512,
        lr: float = 3e-3,
        temperature: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.epochs, self.batch_size, self.lr = dim, epochs, batch_size, lr
        self.temperature, self.seed = temperature, seed

    def fit(self, train: InteractionData, item_features: np.ndarray | None = None) -> TwoTower:
        """Train; `item_features` (n_items, d) initialises the item embeddings (projected to `dim`)."""
        self._remember(train)
        rng = set_seed(self.seed)
        n = train.n_items
        if item_features is not None:
            if item_features.shape[0] != n:
                raise ValueError(f"item_features has {item_features.shape[0]} rows, the catalogue has {n} items.")
            base = torch.from_numpy(np.asarray(item_features, np.float32))
            init = base @ torch.randn(base.shape[1], self.dim) / base.shape[1] ** 0.5
        else:
            init = torch.randn(n, self.dim) * 0.1
        embedding = torch.nn.Parameter(init.clone())
        user_tower, item_tower = self._tower(), self._tower()
        # Examples: for each position p ≥ 1 of each sequence, history = items before p (mean), target = item p.
        seqs = train.sequences()
        hist_rows, hist_cols, targets = [], [], []
        for seq in seqs:
            for p in range(1, len(seq)):
                example = len(targets)
                hist_rows.extend([example] * p)
                hist_cols.extend(seq[:p].tolist())
                targets.append(seq[p])
        if not targets:
            raise ValueError("TwoTower needs users with at least 2 training interactions.")
        import scipy.sparse as sp

        hist = sp.csr_matrix((np.ones(len(hist_rows), np.float32), (hist_rows, hist_cols)), shape=(len(targets), n))
        hist = sp.diags(1.0 / np.maximum(np.asarray(hist.sum(1)).ravel(), 1)) @ hist
        targets = np.array(targets)
        log_q = torch.from_numpy(np.log(np.bincount(targets, minlength=n) / len(targets) + 1e-12).astype(np.float32))
        params = [embedding, *user_tower.parameters(), *item_tower.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        for _ in tqdm(range(self.epochs), desc="two-tower", leave=False):
            order = rng.permutation(len(targets))
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                h = hist[idx].tocoo()
                h = torch.sparse_coo_tensor(
                    torch.from_numpy(np.vstack([h.row, h.col]).astype(np.int64)),
                    torch.from_numpy(h.data.astype(np.float32)),
                    h.shape,
                    check_invariants=True,
                )
                u = F.normalize(user_tower(torch.sparse.mm(h, embedding)), dim=-1)
                t = torch.from_numpy(targets[idx])
                v = F.normalize(item_tower(embedding[t]), dim=-1)
                logits = u @ v.T / self.temperature - log_q[t][None, :]
                same = t[None, :] == t[:, None]  # the same item twice in a batch is not a negative
                logits = logits.masked_fill(same & ~torch.eye(len(t), dtype=torch.bool), float("-inf"))
                loss = F.cross_entropy(logits, torch.arange(len(t)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            self.item_embeddings = embedding.detach().numpy()
            self.item_vectors = F.normalize(item_tower(embedding), dim=-1).numpy()
        self.user_tower = user_tower.eval()
        return self

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
