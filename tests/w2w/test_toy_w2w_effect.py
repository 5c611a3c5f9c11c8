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


def test_directions_are_learnt_from_an_odd_number_of_loras():
    # A median split of 61 LoRAs labels 60 of them; the middle one must be left out of the fit, not looked up.
    import numpy as np

    from imagegem_hf.testing import tiny_sd_components
    from imagegem_hf.toy.w2w_edits import W2WToyConfig, learn_directions
    from imagegem_hf.w2w import WeightSpace, lora_target_shapes, preference_direction
    from imagegem_hf.w2w.demo import synthetic_loras

    shapes = lora_target_shapes(tiny_sd_components(seed=0)["unet"], ["to_q", "to_k", "to_v", "to_out.0"])
    loras, _, planted = synthetic_loras(shapes, n=61, seed=1, noise=0.04)
    space = WeightSpace.build(loras, n_components=12, show_progress=False)
    warmth = np.array([space.vectorize(lora)[0] @ planted for lora in loras])
    brightness = np.random.default_rng(0).normal(size=61)
    directions = learn_directions(space, {"warmth": warmth, "brightness": brightness}, W2WToyConfig())
    assert (directions["raw"].n_positive, directions["raw"].n_negative) == (30, 30)
    # the same fit, labelled by hand: the 30 highest +1, the 30 lowest −1, the median LoRA out
    order = np.argsort(warmth)
    rows = np.r_[order[:30], order[-30:]]
    by_hand = preference_direction(space, space.training_coefficients()[rows], np.r_[[-1] * 30, [1] * 30])
    assert float(directions["raw"].vector @ by_hand.vector) > 0.999
    assert float(directions["raw"].vector @ planted) > 0.9
    assert abs(float(directions["debiased"].normal @ directions["other"].normal)) < 1e-6


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


@pytest.mark.slow
def test_aligned_signs_read_the_users_styles_better():
    # `benchmarks/learn_w2w_signs.py` on the benchmark's population: held-out R² of the true styles from 12
    # coefficients (measured: brightness 0.41 with the per-LoRA sign rule, 0.73 aligned; warmth 0.84, 0.91)
    import numpy as np

    from imagegem_hf.toy import load_toy_pipeline
    from imagegem_hf.toy.loras import STYLE_ATTRIBUTES, user_lora_collection
    from imagegem_hf.toy.w2w_edits import held_out_style_r2

    collection = user_lora_collection(load_toy_pipeline(), show_progress=False)
    styles = np.array([[getattr(s, name) for name in STYLE_ATTRIBUTES] for s in collection.styles])
    rule = held_out_style_r2(collection.files, styles, 12, align_signs=False)
    aligned = held_out_style_r2(collection.files, styles, 12, align_signs=True)
    assert aligned["brightness"] > rule["brightness"] + 0.2
    assert aligned["warmth"] > rule["warmth"]
