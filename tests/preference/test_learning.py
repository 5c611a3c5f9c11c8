"""Synthetic users whose taste is only in their references (fast); the demo's learning run (slow)."""

import numpy as np
import pytest

from imagegem_hf.preference.evaluate import pairwise_accuracy
from imagegem_hf.preference.synthetic_users import (
    ATTRIBUTES,
    AttributeScorer,
    SyntheticUsersConfig,
    reference_rule_scores,
    render_image,
    swap_references,
    synthetic_user_splits,
)
from imagegem_hf.scoring import CLIPScore, PickScore
from imagegem_hf.testing import tiny_clip_model


@pytest.fixture(scope="module")
def world():
    return synthetic_user_splits(SyntheticUsersConfig(train_users=8, test_users=48, seen_users=8))


def _accuracy(scorer, examples, world):
    images0 = [world.load_image(e.image0) for e in examples]
    images1 = [world.load_image(e.image1) for e in examples]
    prompts = [e.prompt for e in examples]
    s0, s1 = scorer.score(images0, prompts).numpy(), scorer.score(images1, prompts).numpy()
    return pairwise_accuracy(s0, s1, np.array([e.label0 for e in examples]))


def test_attribute_scorers_read_the_drawn_attributes():
    # each global score orders two images that differ only in its attribute, for every setting of the others
    rng = np.random.default_rng(0)
    for k, name in enumerate(ATTRIBUTES):
        scorer = AttributeScorer(name)
        for _ in range(20):
            attributes = rng.choice([-1, 1], size=len(ATTRIBUTES))
            high, low = attributes.copy(), attributes.copy()
            high[k], low[k] = 1, -1
            scores = scorer.score([render_image(high, rng), render_image(low, rng)], ["", ""])
            assert scores[0] > scores[1], (name, attributes)


def test_tastes_are_mirrored_mixes_and_pairs_respect_them(world):
    tastes = np.stack(list(world.tastes.values()))
    np.testing.assert_allclose(tastes[0::2], -tastes[1::2])  # mirrored couples
    np.testing.assert_allclose(np.abs(tastes).sum(1), 1.0)  # a mix of the four attributes
    assert len({tuple(np.round(t, 6)) for t in tastes}) == len(tastes)  # every user a different mix
    for split in world.splits.values():
        for e in split:
            w = world.tastes[e.user_id]
            gap = w @ (world.attributes[e.liked] - world.attributes[e.disliked])
            assert gap >= world.config.margin
            assert all(
                w @ (world.attributes[g] - world.attributes[b]) >= world.config.margin for g, b, _ in e.references
            )


def test_no_target_is_a_reference_or_a_training_target(world):
    train_targets = {k for e in world.splits["train"] for k in (e.image0, e.image1)}
    for name in ("test_seen", "test_unseen"):
        for e in world.splits[name]:
            references = {k for r in e.references for k in r[:2]}
            assert {e.image0, e.image1}.isdisjoint(references | train_targets)
    unseen_users = {e.user_id for e in world.splits["test_unseen"]}
    assert unseen_users.isdisjoint(e.user_id for e in world.splits["train"])


def test_global_scores_are_at_chance_and_the_reference_rule_is_not(world):
    unseen = world.splits["test_unseen"]
    clip, clip_processor = tiny_clip_model(seed=0)
    global_scores = {name: AttributeScorer(name) for name in ATTRIBUTES}
    global_scores |= {"CLIP score": CLIPScore(clip, clip_processor), "PickScore": PickScore(clip, clip_processor)}
    for name, scorer in global_scores.items():
        accuracy = _accuracy(scorer, unseen, world)
        assert 0.4 <= accuracy <= 0.6, (name, accuracy)  # either sign of the score is near chance
    labels = np.array([e.label0 for e in unseen])
    rule = pairwise_accuracy(*reference_rule_scores(unseen, world.attributes), labels)
    swapped = pairwise_accuracy(*reference_rule_scores(swap_references(unseen), world.attributes), labels)
    assert rule >= 0.95 and swapped <= 0.05, (rule, swapped)


@pytest.mark.slow
def test_the_demo_size_run_learns_to_read_references(tmp_path):
    """The demo's run (256 training users): far below the benchmark's accuracy, yet the model clearly reads the
    references (measured 63.8–66.5% unseen, 30–33% swapped, by thread count) while every global score stays at
    chance."""
    from imagegem_hf.preference.learning import demo_learning_config, run_learning_experiment

    table = run_learning_experiment(demo_learning_config(), tmp_path).table
    unseen, swapped = "pairwise unseen", "pairwise unseen, references swapped"
    model, stage1 = table.loc["stage 1 + prototypes (stage 2)"], table.loc["stage 1 (LoRA)"]
    best_global = table.loc[[m for m in table.index if m.startswith("global:")], unseen].max()
    assert best_global <= 0.6 and table.loc["reference rule (true attributes)", unseen] >= 0.95
    assert abs(table.loc["toy VLM before stage 1", unseen] - 0.5) <= 0.06  # untrained: chance (448 pairs)
    assert model[unseen] >= 0.6 and model[swapped] <= 0.4, model
    assert model[unseen] >= stage1[unseen] - 0.02


def test_toy_vlm_reference_turn_is_five_tokens_and_shared_prefix_matches_full_sequences(world):
    import torch

    from imagegem_hf.preference import PreferencePrototypeModel, build_pair_batch
    from imagegem_hf.preference.toy_vlm import ToyVLMConfig, toy_vlm

    backbone, processor = toy_vlm(ToyVLMConfig())
    assert backbone.config.text_config.layer_types == ["sliding_attention", "full_attention"]
    model, builder = PreferencePrototypeModel.from_backbone(
        backbone, processor, num_prototypes=2, n_ref=world.config.n_ref, use_prompt=False
    )
    examples = world.splits["test_unseen"][:3]
    queries = [[e.query(world.load_image, getattr(e, key)) for e in examples] for key in ("image0", "image1")]
    full = builder(queries[0] + queries[1])
    tokens = processor.tokenizer.convert_ids_to_tokens(full["input_ids"][0][:5])
    assert tokens[:4] == ["<user>", "<image>", "Score for this image?", "<assistant>"] and tokens[4] in ("+", "-")
    assert full["input_ids"].shape[1] == 5 * 2 * world.config.n_ref + 4
    with torch.no_grad():
        torch.testing.assert_close(model(**build_pair_batch(builder, *queries)).logits, model(**full).logits)


@pytest.mark.slow
def test_pretrained_toy_vlm_names_every_attribute(tmp_path):
    # interleaved captions alone taught colour and brightness only (shape and texture at chance)
    from imagegem_hf.preference.toy_vlm import ToyVLMConfig, pretrained_toy_vlm

    _, _, accuracy = pretrained_toy_vlm(ToyVLMConfig(), cache_dir=tmp_path)
    assert all(accuracy[name] >= 0.95 for name in ATTRIBUTES), accuracy
