"""W2W has an effect in the toy world (`benchmarks/learn_w2w.py` at a smaller size): the edited attribute moves
monotonically with α, the shuffled-label control does not, and debiasing shrinks the other attribute's change."""

from __future__ import annotations

import pytest

from imagegem_hf.toy.w2w_edits import run_w2w_effect, small_config


@pytest.fixture(scope="module")
def effect(tmp_path_factory):
    from imagegem_hf.toy import load_toy_pipeline

    folder = tmp_path_factory.mktemp("toy_user_loras")
    return run_w2w_effect(load_toy_pipeline(), folder, small_config(), show_progress=False)


@pytest.mark.parametrize("n_positive, n_negative", [(26, 26), (7, 9), (1, 3)])
def test_control_labels_carry_no_information_about_the_real_ones(n_positive, n_negative):
    import numpy as np

    from imagegem_hf.toy.w2w_edits import uninformative_labels

    y = np.random.default_rng(0).permutation([1] * n_positive + [-1] * n_negative)
    z = uninformative_labels(y, seed=3)
    assert (z == 1).sum() == n_positive  # the classes keep their sizes
    flipped = min(n_positive, n_negative) // 2
    assert ((z != y) & (y == 1)).sum() == flipped and ((z != y) & (y == -1)).sum() == flipped


@pytest.mark.slow
def test_toy_w2w_edits_move_the_attribute_and_the_control_does_not(effect):
    assert effect.spearman("raw", "warmth") >= 0.9
    assert effect.spearman("debiased", "warmth") >= 0.9
    assert abs(effect.spearman("shuffled", "warmth")) < 0.9  # the control fails


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="Not met at this size: debiasing shrinks brightness's change per unit α 1.3× over 40 LoRAs (target 5×).",
)
def test_toy_w2w_debias_shrinks_the_other_attribute(effect):
    assert abs(effect.slope("raw", "brightness")) >= 5 * abs(effect.slope("debiased", "brightness"))
