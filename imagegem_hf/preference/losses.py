"""The losses of paper 003 (REFERENCE §7): a base classification loss and a pairwise auxiliary loss.

`logits` everywhere are `(batch, 2)` tensors `[M⁺, M⁻]`: the like and dislike token logits at the last position
(what `PreferencePrototypeModel` returns). Row `i` of `pos_logits` and of `neg_logits` score the liked (`z_pos`)
and disliked (`z_neg`) image of the same pair with the same references `S`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LIKE, DISLIKE = 0, 1  # column of M⁺ and M⁻ in the logits


def base_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """`L_base = ½ [CE(M(S, z_pos), "+") + CE(M(S, z_neg), "−")]`, cross-entropy over the two label logits,
    averaged over the batch.

    Example:
        ```python
        >>> import torch
        >>> round(base_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])).item(), 4)
        0.1269
        ```
    """
    like = torch.full((pos_logits.shape[0],), LIKE, dtype=torch.long, device=pos_logits.device)
    dislike = torch.full((neg_logits.shape[0],), DISLIKE, dtype=torch.long, device=neg_logits.device)
    return 0.5 * (F.cross_entropy(pos_logits, like) + F.cross_entropy(neg_logits, dislike))


def aux_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """`L_aux = L₊ + L₋ = −log σ(M⁺(z_pos) − M⁺(z_neg)) − log σ(M⁻(z_neg) − M⁻(z_pos))`, each averaged over the batch.

    Example:
        ```python
        >>> import torch
        >>> round(aux_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item(), 4)
        0.6265
        ```
    """
    plus = -F.logsigmoid(pos_logits[:, LIKE] - neg_logits[:, LIKE]).mean()
    minus = -F.logsigmoid(neg_logits[:, DISLIKE] - pos_logits[:, DISLIKE]).mean()
    return plus + minus


def preference_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, aux_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """`L_all = L_base + aux_weight · L_aux` (the paper uses weight 1), with its parts.

    Returns:
        `{"loss": L_all, "base": L_base, "aux": L_aux}`.

    Example:
        ```python
        >>> import torch
        >>> parts = preference_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
        >>> sorted(parts)
        ['aux', 'base', 'loss']
        ```
    """
    if pos_logits.shape != neg_logits.shape or pos_logits.ndim != 2 or pos_logits.shape[1] != 2:
        raise ValueError(
            f"pos_logits and neg_logits must both be (batch, 2) [like, dislike] logits, got "
            f"{tuple(pos_logits.shape)} and {tuple(neg_logits.shape)}."
        )
    base, aux = base_loss(pos_logits, neg_logits), aux_loss(pos_logits, neg_logits)
    return {"loss": base + aux_weight * aux, "base": base, "aux": aux}
