"""W2W has an effect in the toy world (`benchmarks/learn_w2w.py` at a smaller size): the edited attribute moves
monotonically with α, the shuffled-label control does not, and debiasing shrinks the other attribute's change."""

from __future__ import annotations

import pytest

from imagegem_hf.toy.w2w_edits import run_w2w_effect, small_config


@pytest.mark.slow
def test_toy_w2w_edits_move_the_attribute_and_debias_removes_the_other(tmp_path):
    from imagegem_hf.toy import load_toy_pipeline

    effect = run_w2w_effect(load_toy_pipeline(), tmp_path / "loras", small_config(), show_progress=False)
    assert effect.spearman("raw", "warmth") >= 0.9
    assert effect.spearman("debiased", "warmth") >= 0.9
    assert abs(effect.spearman("shuffled", "warmth")) < 0.9  # the control fails
    assert abs(effect.slope("raw", "brightness")) >= 5 * abs(effect.slope("debiased", "brightness"))
