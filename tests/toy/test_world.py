import numpy as np
import pytest
import torch
from PIL import Image

from imagegem_hf.scoring import Scorer
from imagegem_hf.toy import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    ToyReward,
    ToySpec,
    all_prompts,
    attribute_accuracy,
    measure_attributes,
    parse_prompt,
    prompt_for,
    random_spec,
    render,
    sample_world,
    toy_tokenizer,
)


def test_measures_recover_the_attributes_of_rendered_images():
    rng = np.random.default_rng(0)
    specs = [random_spec(rng) for _ in range(300)]
    measured = measure_attributes([render(spec) for spec in specs])
    for attribute in ("colour", "shape", "background"):
        assert measured[attribute].tolist() == [getattr(spec, attribute) for spec in specs]
    radius = np.array([spec.size for spec in specs])
    # Anti-aliased edges: the thresholded subject is at most about a pixel off the drawn equal-area radius.
    assert np.abs(measured["radius"] - radius).max() < 1.0
    assert np.corrcoef(measured["radius"], radius)[0, 1] > 0.99
    drawn_hue = np.array([COLOURS[s.colour] + s.hue_jitter for s in specs])
    hue_error = np.abs((measured["hue"] - drawn_hue + 180) % 360 - 180)
    assert hue_error.max() < 3.0
    warm = measured["warmth"][[s.colour == "red" for s in specs]]
    cool = measured["warmth"][[s.colour == "blue" for s in specs]]
    assert warm.min() > 0.5 > -0.5 > cool.max()


def test_grammar_round_trips_and_covers_every_combination():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == (len(COLOURS) + 1) * (len(SHAPES) + 1) * (len(BACKGROUNDS) + 1)
    assert parse_prompt(prompt_for("cyan", "triangle", "light")) == {
        "colour": "cyan",
        "shape": "triangle",
        "background": "light",
    }
    assert parse_prompt("a shape") == {}
    specs, texts = sample_world(200, seed=3)
    for spec, text in zip(specs, texts, strict=True):
        for attribute, value in parse_prompt(text).items():
            assert getattr(spec, attribute) == value


def test_attribute_accuracy_counts_named_attributes_and_chance():
    red_circle = render(ToySpec("red", "circle", "dark", size=8.0))
    result = attribute_accuracy([red_circle, red_circle], ["a red circle", "a blue square on a dark background"])
    # named: colour ×2, shape ×2, background ×1; right: red, circle, dark
    assert result["n"] == 5
    assert result["mean"] == pytest.approx(3 / 5)
    assert result["colour"] == 0.5 and result["shape"] == 0.5 and result["background"] == 1.0
    assert result["chance"] == pytest.approx((2 / 6 + 2 / 3 + 1 / 2) / 5)


def test_reward_is_a_scorer_ordered_by_subject_size():
    reward = ToyReward()
    assert isinstance(reward, Scorer)
    images = [render(ToySpec("green", "square", "light", size=s)) for s in (5.0, 6.5, 8.0, 9.5)]
    scores = reward.score(images, ["a green square"] * 4)
    assert scores.dtype == torch.float32
    assert torch.all(scores[1:] > scores[:-1])
    # 100 × subject area / 1024, the area π·r² of the equal-area radius r give or take the one-pixel anti-aliased rim
    for score, r in zip(scores.tolist(), (5.0, 6.5, 8.0, 9.5), strict=True):
        assert 100 * np.pi * (r - 1) ** 2 / 1024 < score < 100 * np.pi * (r + 1) ** 2 / 1024
    with pytest.raises(ValueError, match="one prompt per image"):
        reward.score(images, ["a green square"])


def test_reward_does_not_grow_when_images_are_blurred_or_noisy():
    # A fine-tuned model that only degrades its images (softer edges, speckle) must not win on the reward: the
    # thresholded pixel count grows with both (by up to a third for a blur of one pixel), the subject's area does not.
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    clean, blurred, noisy = [], [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                for size in (5.5, 8.5):
                    image = render(ToySpec(colour, shape, background, size))
                    clean.append(image)
                    blurred.append(image.filter(ImageFilter.GaussianBlur(1.0)))
                    x = np.asarray(image, dtype=np.float32) / 255.0
                    noisy.append(np.clip(x + rng.normal(0.0, 0.1, x.shape), 0.0, 1.0).astype(np.float32))
    reward = ToyReward()
    prompts = ["a shape"] * len(clean)
    base = reward.score(clean, prompts).numpy()
    blur_change = reward.score(blurred, prompts).numpy() / base - 1.0
    noise_change = np.array([float(reward.score([Image.fromarray(np.uint8(255 * x))], ["a shape"])) for x in noisy])
    noise_change = noise_change / base - 1.0
    assert np.abs(blur_change).max() < 0.03
    assert noise_change.mean() < 0.02


def test_tokenizer_spells_each_word_as_one_token():
    tokenizer = toy_tokenizer()
    prompt = prompt_for("magenta", "triangle", "light")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
    assert tokens == ["<|startoftext|>", *[w + "</w>" for w in prompt.split()], "<|endoftext|>"]
    assert tokenizer.model_max_length >= len(tokens)
