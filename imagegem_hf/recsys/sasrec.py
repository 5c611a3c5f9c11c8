"""SASRec (Kang & McAuley 2018): causal self-attention over a user's item sequence.

Training uses one sequence per user with the next-item loss at *every* position (causal attention), instead of
expanding every prefix into its own example; the loss is a full softmax over the catalogue, or a sampled softmax
(uniform negatives with logQ correction) when the catalogue is large.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from imagegem_hf.recsys.base import Recommender, set_seed
from imagegem_hf.recsys.data import InteractionData
from imagegem_hf.recsys.training import ScheduledTraining, endless_batches, run_schedule, validation_sample


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
        """(batch, len ≤ max_len) item indices + 1 (0 = pad, left-padded) → (batch, len, dim) hidden states.

        Positions count from the right end of a `max_len` window, so an input with its all-padding columns cut off
        (see `trim_padding`) gives the same hidden states as the full-width one.
        """
        batch, length = seq.shape
        max_len = self.positions.num_embeddings
        x = self.items(seq) * self.items.embedding_dim**0.5 + self.positions.weight[max_len - length :]
        # Query i may see key j when j ≤ i and j is not padding; a padding query sees only itself, so that no
        # row is fully masked (a fully masked row is NaN and would leak NaN into later layers).
        pad = seq == 0
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal[None] & ~pad[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool)[None] & pad[:, :, None]
        heads = self.encoder.layers[0].self_attn.num_heads
        blocked = (~allowed).repeat_interleave(heads, dim=0)
        return self.norm(self.encoder(self.dropout(x), mask=blocked))


def trim_padding(seq: np.ndarray) -> np.ndarray:
    """Drop the leading columns that are padding in every row of a left-padded batch (short sequences then cost
    their own length, not `max_len`)."""
    filled = np.flatnonzero((seq > 0).any(axis=0))
    return seq[:, filled[0] :] if len(filled) else seq[:, -1:]


def left_pad(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """Last `max_len` items of each sequence, shifted by +1 (0 = padding), left-padded."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:] + 1
        if len(tail):
            out[row, -len(tail) :] = tail
    return out


class SASRec(ScheduledTraining, Recommender):
    """Self-attentive sequential recommendation.

    Training follows `imagegem_hf.recsys.training`: a step budget scaled to the data (`budget_epochs` epochs of
    one sequence per user, at least `min_steps`, at most 200,000 steps), linear learning-rate warmup, and, when
    `fit` gets validation data, early stopping on validation NDCG@10 every `eval_every` steps with `patience`
    counted in evaluations and never before `min_steps`; the best weights are restored.

    Args:
        dim: Hidden size.
        layers: Transformer layers.
        heads: Attention heads.
        max_len: Sequence length (the most recent items).
        dropout: Dropout.
        batch_size: Users per step.
        lr: Adam learning rate (after warmup).
        num_negatives: 0 for full softmax; otherwise sampled softmax with this many shared uniform negatives.
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
        >>> from imagegem_hf.recsys import SASRec
        >>> model = SASRec().fit(train, validation=val)  # doctest: +SKIP
        >>> model.history_[-1]  # doctest: +SKIP
        {'step': 600, 'loss': 6.1, 'cpu_seconds': 179.6, 'val_ndcg@10': 0.098}
        ```
    """

    name = "sasrec"
    config_keys = (
        "dim",
        "layers",
        "heads",
        "max_len",
        "dropout",
        "batch_size",
        "lr",
        "num_negatives",
        *ScheduledTraining.SCHEDULE_KEYS,
        "seed",
    )

    def __init__(
        self,
        dim: int = 64,
        layers: int = 2,
        heads: int = 2,
        max_len: int = 50,
        dropout: float = 0.2,
        batch_size: int = 128,
        lr: float = 1e-3,
        num_negatives: int = 0,
        max_steps: int | None = None,
        budget_epochs: float = 100.0,
        min_steps: int = 500,
        eval_every: int | None = None,
        patience: int = 5,
        warmup_steps: int = 100,
        eval_users: int = 10_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.layers, self.heads, self.max_len, self.dropout = dim, layers, heads, max_len, dropout
        self.batch_size, self.lr, self.num_negatives = batch_size, lr, num_negatives
        self.max_steps, self.budget_epochs, self.min_steps, self.eval_every = (
            max_steps,
            budget_epochs,
            min_steps,
            eval_every,
        )
        self.patience, self.warmup_steps, self.eval_users, self.seed = patience, warmup_steps, eval_users, seed
        self.network: SASRecNetwork | None = None

    def _new_network(self, n_items: int) -> SASRecNetwork:
        return SASRecNetwork(n_items, self.dim, self.layers, self.heads, self.max_len, self.dropout)

    def training_inputs(self, train: InteractionData) -> np.ndarray:
        """Left-padded, +1-shifted sequences of users with ≥ 2 items, `max_len + 1` long (inputs `[:, :-1]`,
        next-item targets `[:, 1:]`)."""
        inputs = left_pad(train.sequences(), self.max_len + 1)
        return inputs[(inputs > 0).sum(1) >= 2]

    def loss(self, batch: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Next-item cross-entropy at every non-pad position of a batch of `training_inputs` rows."""
        n_items = self.network.items.num_embeddings - 1
        batch = torch.from_numpy(trim_padding(batch))
        x, y = batch[:, :-1], batch[:, 1:]
        valid = (x > 0) & (y > 0)
        h = self.network(x)[valid]
        target = y[valid]  # +1-shifted item indices
        if not self.num_negatives:
            return F.cross_entropy(h @ self.network.items.weight[1:].T, target - 1)
        negatives = torch.from_numpy(rng.integers(1, n_items + 1, self.num_negatives))
        positive = (h * self.network.items(target)).sum(-1, keepdim=True)
        # Uniform negatives: the logQ correction subtracts log(num_negatives / n_items) from each.
        negative = h @ self.network.items(negatives).T - np.log(self.num_negatives / n_items)
        negative = negative.masked_fill(negatives[None, :] == target[:, None], float("-inf"))
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long))

    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> SASRec:
        """Train on each user's time-ordered sequence; early-stop on validation NDCG@10 when given.

        The resolved schedule is kept in `schedule_` and one record per evaluation in `history_`.
        """
        self._remember(train)
        rng = set_seed(self.seed)
        self.network = self._new_network(train.n_items)
        inputs = self.training_inputs(train)
        if len(inputs) == 0:
            raise ValueError("SASRec needs users with at least 2 training interactions.")
        self.schedule_ = self.resolve_schedule(len(inputs))
        val = None if validation is None else validation_sample(validation, self.eval_users, self.seed)
        self.history_ = run_schedule(
            self.schedule_,
            self.network,
            torch.optim.Adam(self.network.parameters(), lr=self.lr),
            lambda idx: self.loss(inputs[idx], rng),
            endless_batches(len(inputs), self.batch_size, rng),
            validate=None if val is None else lambda: self.validation_ndcg(val),
            desc="sasrec",
        )
        return self

    @torch.no_grad()
    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        self._check_fitted()
        self.network.eval()
        sequences = (history or self.train).sequences()
        out = []
        for start in range(0, len(users), 512):
            seq = left_pad([sequences[u] for u in users[start : start + 512]], self.max_len)
            seq = torch.from_numpy(trim_padding(seq))
            h = self.network(seq)[:, -1]
            out.append((h @ self.network.items.weight[1:].T).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.item_ids)), np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.network.state_dict().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.network = self._new_network(len(self.item_ids))
        self.network.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        self.network.eval()
