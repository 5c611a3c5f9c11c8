"""SASRec (Kang & McAuley 2018): causal self-attention over a user's item sequence.

Training uses one sequence per user with the next-item loss at *every* position (causal attention), instead of
expanding every prefix into its own example; the loss is a full softmax over the catalogue, or a sampled softmax
(uniform negatives with logQ correction) when the catalogue is large.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from imagegem_hf.recsys.base import Recommender, set_seed
from imagegem_hf.recsys.data import InteractionData
from imagegem_hf.recsys.metrics import metrics_from_ranks, target_ranks


class SASRecNetwork(torch.nn.Module):
    """Item embeddings (index 0 = padding) + learned positions + a causal Transformer encoder."""

    def __init__(self, n_items: int, dim: int, layers: int, heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.items = torch.nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.positions = torch.nn.Embedding(max_len, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.dropout = torch.nn.Dropout(dropout)
        # Scaled by √dim in forward, so entries enter the encoder at unit scale and logits start near N(0, 1).
        torch.nn.init.normal_(self.items.weight, std=dim**-0.5)
        torch.nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(batch, len) item indices + 1 (0 = pad, left-padded) → (batch, len, dim) hidden states."""
        batch, length = seq.shape
        x = self.items(seq) * self.items.embedding_dim**0.5 + self.positions.weight[:length]
        # Query i may see key j when j ≤ i and j is not padding; a padding query sees only itself, so that no
        # row is fully masked (a fully masked row is NaN and would leak NaN into later layers).
        pad = seq == 0
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal[None] & ~pad[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool)[None] & pad[:, :, None]
        heads = self.encoder.layers[0].self_attn.num_heads
        blocked = (~allowed).repeat_interleave(heads, dim=0)
        return self.norm(self.encoder(self.dropout(x), mask=blocked))


def left_pad(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """Last `max_len` items of each sequence, shifted by +1 (0 = padding), left-padded."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:] + 1
        if len(tail):
            out[row, -len(tail) :] = tail
    return out


class SASRec(Recommender):
    """Self-attentive sequential recommendation.

    Args:
        dim: Hidden size.
        layers: Transformer layers.
        heads: Attention heads.
        max_len: Sequence length (the most recent items).
        dropout: Dropout.
        epochs: Maximum training epochs.
        batch_size: Users per step.
        lr: Adam learning rate.
        num_negatives: 0 for full softmax; otherwise sampled softmax with this many shared uniform negatives.
        patience: Stop after this many epochs without a better validation NDCG@10 (when validation is given).
        seed: Seed.

    Example:
        ```python
        >>> from imagegem_hf.recsys import SASRec
        >>> model = SASRec(epochs=20).fit(train, validation=val)  # doctest: +SKIP
        ```
    """

    name = "sasrec"
    config_keys = (
        "dim",
        "layers",
        "heads",
        "max_len",
        "dropout",
        "epochs",
        "batch_size",
        "lr",
        "num_negatives",
        "patience",
        "seed",
    )

    def __init__(
        self,
        dim: int = 64,
        layers: int = 2,
        heads: int = 2,
        max_len: int = 50,
        dropout: float = 0.2,
        epochs: int = 30,
        batch_size: int = 128,
        lr: float = 1e-3,
        num_negatives: int = 0,
        patience: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.layers, self.heads, self.max_len, self.dropout = dim, layers, heads, max_len, dropout
        self.epochs, self.batch_size, self.lr, self.num_negatives = epochs, batch_size, lr, num_negatives
        self.patience, self.seed = patience, seed
        self.network: SASRecNetwork | None = None

    def _new_network(self, n_items: int) -> SASRecNetwork:
        return SASRecNetwork(n_items, self.dim, self.layers, self.heads, self.max_len, self.dropout)

    def train_epoch(self, inputs: np.ndarray, optimizer: torch.optim.Optimizer, rng: np.random.Generator) -> float:
        """One epoch over (input, next-item) sequences with the loss at every non-pad position."""
        self.network.train()
        n_items = self.network.items.num_embeddings - 1
        total = 0.0
        order = rng.permutation(len(inputs))
        for start in range(0, len(inputs), self.batch_size):
            batch = torch.from_numpy(inputs[order[start : start + self.batch_size]])
            x, y = batch[:, :-1], batch[:, 1:]
            valid = (x > 0) & (y > 0)
            h = self.network(x)[valid]
            target = y[valid]  # +1-shifted item indices
            if self.num_negatives:
                negatives = torch.from_numpy(rng.integers(1, n_items + 1, self.num_negatives))
                positive = (h * self.network.items(target)).sum(-1, keepdim=True)
                # Uniform negatives: the logQ correction subtracts log(num_negatives / n_items) from each.
                negative = h @ self.network.items(negatives).T - np.log(self.num_negatives / n_items)
                negative = negative.masked_fill(negatives[None, :] == target[:, None], float("-inf"))
                logits = torch.cat([positive, negative], dim=1)
                loss = F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long))
            else:
                loss = F.cross_entropy(h @ self.network.items.weight[1:].T, target - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        return total / len(inputs)

    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> SASRec:
        """Train on each user's time-ordered sequence; early-stop on validation NDCG@10 when given."""
        self._remember(train)
        rng = set_seed(self.seed)
        self.network = self._new_network(train.n_items)
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.lr)
        inputs = left_pad(train.sequences(), self.max_len + 1)
        inputs = inputs[(inputs > 0).sum(1) >= 2]
        if len(inputs) == 0:
            raise ValueError("SASRec needs users with at least 2 training interactions.")
        best, best_state, stale = -1.0, None, 0
        self.history_: list[dict[str, float]] = []
        for epoch in tqdm(range(self.epochs), desc="sasrec", leave=False):
            loss = self.train_epoch(inputs, optimizer, rng)
            record = {"epoch": epoch, "loss": loss}
            if validation is not None:
                ndcg = self.validation_ndcg(validation)
                record["val_ndcg@10"] = ndcg
                if ndcg > best:
                    best, best_state, stale = ndcg, copy.deepcopy(self.network.state_dict()), 0
                else:
                    stale += 1
            self.history_.append(record)
            if validation is not None and stale >= self.patience:
                break
        if best_state is not None:
            self.network.load_state_dict(best_state)
        self.network.eval()
        return self

    def validation_ndcg(self, validation: InteractionData) -> float:
        users = validation.user_index
        ranks = target_ranks(self.score(users), validation.item_index, self.train.csr()[users])
        return metrics_from_ranks(ranks, ks=(10,))["ndcg@10"]

    @torch.no_grad()
    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        self._check_fitted()
        self.network.eval()
        sequences = (history or self.train).sequences()
        out = []
        for start in range(0, len(users), 512):
            seq = torch.from_numpy(left_pad([sequences[u] for u in users[start : start + 512]], self.max_len))
            h = self.network(seq)[:, -1]
            out.append((h @ self.network.items.weight[1:].T).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.item_ids)), np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.network.state_dict().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.network = self._new_network(len(self.item_ids))
        self.network.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        self.network.eval()
