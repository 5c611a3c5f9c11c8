import math

import pytest
import torch

from imagegem_hf.preference.losses import aux_loss, base_loss, preference_loss


def log_softmax_row(row, index):
    return row[index] - math.log(sum(math.exp(v) for v in row))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


POS = [[1.5, -0.5], [0.2, 0.7], [-1.0, 2.0]]
NEG = [[0.3, 0.1], [1.2, -0.4], [0.0, 0.5]]


def test_base_loss_matches_hand_computation():
    n = len(POS)
    like = -sum(log_softmax_row(r, 0) for r in POS) / n
    dislike = -sum(log_softmax_row(r, 1) for r in NEG) / n
    expected = 0.5 * (like + dislike)
    assert base_loss(torch.tensor(POS), torch.tensor(NEG)).item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_matches_hand_computation():
    n = len(POS)
    plus = -sum(math.log(sigmoid(p[0] - q[0])) for p, q in zip(POS, NEG, strict=True)) / n
    minus = -sum(math.log(sigmoid(q[1] - p[1])) for p, q in zip(POS, NEG, strict=True)) / n
    assert aux_loss(torch.tensor(POS), torch.tensor(NEG)).item() == pytest.approx(plus + minus, rel=1e-6)


def test_total_is_the_sum_and_gradients_flow():
    pos = torch.tensor(POS, requires_grad=True)
    parts = preference_loss(pos, torch.tensor(NEG))
    assert parts["loss"].item() == pytest.approx(parts["base"].item() + parts["aux"].item(), rel=1e-6)
    parts["loss"].backward()
    # raising the like logit of liked images lowers both terms
    assert (pos.grad[:, 0] < 0).all()


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="batch, 2"):
        preference_loss(torch.zeros(3, 2), torch.zeros(2, 2))
