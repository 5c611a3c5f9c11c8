"""The toy ranker VLM: its answers, tokenizer and training (fast); the learning benchmark at a small size (slow)."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from imagegem_hf.preference.synthetic_users import ATTRIBUTES, draw_attributes, render_image
from imagegem_hf.ranker import RankerConfig, RankItem, VLMRankerPipeline, parse_scores
from imagegem_hf.ranker.toy_vlm import (
    NUMBER_EMBEDDING_SCALE,
    ToyProfile,
    ToyRankerVLMConfig,
    answer_token_budget,
    pretrain_vision_on_words,
    pretrained_toy_ranker_vlm,
    ranking_answer,
    tokenize_conversations,
    toy_ranker_tokenizer,
    toy_ranker_vlm,
    train_toy_ranker_vlm,
    training_conversations,
)

# colour, shape, brightness, texture (ATTRIBUTES order), ±1
HISTORY = np.array([[1, 1, 1, 1], [1, 1, -1, 1], [1, -1, -1, 1], [-1, 1, -1, -1], [1, 1, 1, -1]])


def test_profile_text_score_and_explanation_match_a_hand_computation():
    profile = ToyProfile.of(HISTORY)
    # majorities: red 4/5, circle 4/5, dark 3/5 (bright 2/5), striped 3/5
    assert profile.text() == (
        "1. Primary Subject Type: circle\n"
        "2. Defining Visual Features: red\n"
        "3. Artistic Style: striped\n"
        "4. Background Elements: dark"
    )
    assert ToyProfile.parse(profile.text()) == profile
    assert ToyProfile.parse("red circles, mostly") is None
    assert ToyProfile.of(HISTORY[:2]).values == (1, 1, -1, 1)  # a 1–1 tie of brightness goes to the latest image
    blue_bright_striped_circle = np.array([-1, 1, 1, 1])
    # shared with the profile: circle and striped (not blue, not bright); 25 points per shared field
    assert profile.score(blue_bright_striped_circle) == 50
    assert profile.explanation(blue_bright_striped_circle) == "circle+ blue- striped+ bright-"
    assert profile.score(-np.array([1, 1, -1, 1])) == 0
    assert profile.explanation(-np.array([1, 1, -1, 1])) == "square- blue- plain- bright-"


def test_ranking_answers_explain_before_they_score_and_the_score_counts_the_shared_fields():
    rng = np.random.default_rng(1)
    for content, _, answer in training_conversations(ToyRankerVLMConfig(), 8, rng, 6):
        profile = ToyProfile.parse(content[0]["text"].split("\n", 1)[1].split("\n\n")[0])
        assert profile is not None
        for record in json.loads(answer):
            assert list(record) == ["image_id", "explanation", "similarity_score"]
            marks = [word[-1] for word in record["explanation"].split(" ")]
            assert len(marks) == 4 and set(marks) <= {"+", "-"}
            assert record["similarity_score"] == 25 * marks.count("+")


def test_the_answer_token_budget_fits_the_longest_answer():
    tokenizer = toy_ranker_tokenizer()
    for n in (1, 5, 10):
        longest = ranking_answer(list(range(990, 990 + n)), ToyProfile((1, 1, 1, 1)), [np.ones(4)] * n)
        assert json.loads(longest)[0]["similarity_score"] == 100
        assert len(tokenizer(longest, add_special_tokens=False).input_ids) + 1 == answer_token_budget(n)  # + </s>


def test_ids_are_the_same_single_tokens_in_the_prompt_and_in_the_answer():
    _, processor = toy_ranker_vlm(ToyRankerVLMConfig())
    tokenizer = processor.tokenizer
    rng = np.random.default_rng(0)
    (content, _, answer), *_ = training_conversations(ToyRankerVLMConfig(), 1, rng, 4)
    prompt = tokenizer(processor.apply_chat_template([{"role": "user", "content": content}]), add_special_tokens=False)
    prompt_tokens = tokenizer.convert_ids_to_tokens(prompt.input_ids)
    answer_tokens = tokenizer.convert_ids_to_tokens(tokenizer(answer, add_special_tokens=False).input_ids)
    shown = [t.split(": ")[1].rstrip(". ") for part in content if (t := part.get("text", "")).startswith("image_id: ")]

    def after(tokens, markers):  # the token that follows each marker token
        return [tokens[i + 1] for i, t in enumerate(tokens) if t in markers]

    assert after(prompt_tokens, {"image_id: "}) == shown
    assert after(answer_tokens, {'[{"image_id": ', '}, {"image_id": '}) == shown
    # one token per number, ids and scores alike, also where a number is followed by text
    for number in ("0", "7", "42", "100", "437", "999"):
        assert tokenizer.tokenize(number) == [number]
    assert tokenizer.tokenize("image_id: 437. ") == ["image_id: ", "437", ". "]
    # the profile's field titles stay whole beside the numbers
    assert tokenizer.tokenize(ToyProfile((1, 1, 1, 1)).text()) == [
        "1. Primary Subject Type:",
        " circle",
        "\n2. Defining Visual Features:",
        " red",
        "\n3. Artistic Style:",
        " striped",
        "\n4. Background Elements:",
        " bright",
    ]


def test_training_answers_parse_to_the_programmatic_scores():
    config = ToyRankerVLMConfig()
    _, processor = toy_ranker_vlm(config)
    tokenizer = processor.tokenizer
    rng = np.random.default_rng(0)
    for n_candidates in (None, 1, 4, 10):
        for content, images, answer in training_conversations(config, 3, rng, n_candidates):
            ids = tokenizer(answer, add_special_tokens=False).input_ids
            assert tokenizer.decode(ids) == answer
            texts = [part["text"] for part in content if part["type"] == "text"]
            if n_candidates is None:
                assert texts[-1] == VLMRankerPipeline(backend=object()).templates.image_captioning
                assert ToyProfile.parse(answer) is not None and len(images) >= 1
                continue
            shown = [t.split(": ")[1].rstrip(". ") for t in texts if t.startswith("image_id: ")]
            parsed = parse_scores(answer, shown)
            # per object: its opening, the id, the explanation key, 4 words and 4 marks, the score key, the score;
            # then the closing
            assert len(ids) == 13 * n_candidates + 1
            profile = ToyProfile.parse(texts[0].split("\n", 1)[1].split("\n\n")[0])
            assert list(parsed.scores) == shown and not parsed.problems
            assert len(images) == n_candidates and profile is not None
    batch = tokenize_conversations(processor, training_conversations(config, 2, rng, 3))
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.convert_ids_to_tokens(labelled.tolist())[0] == '[{"image_id": '
    assert labelled[-1] == tokenizer.eos_token_id


def test_training_runs_caches_and_loads_with_the_auto_classes(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = ToyRankerVLMConfig(
        vision_pretrain_steps=2, train_steps=3, batch_size=2, text_hidden_size=32, text_layers=1
    )
    folder = pretrained_toy_ranker_vlm(config, cache_dir=tmp_path, progress=False)
    assert (folder / "training.json").is_file() and folder.parent == tmp_path
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained_toy_ranker_vlm(config, cache_dir=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # the cache is used, not retrained
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.get_vocab() == toy_ranker_tokenizer().get_vocab()
    ranker = VLMRankerPipeline.from_pretrained(folder, max_new_tokens=8, k_subset=2, n_trials=2)
    (_, images, _), *_ = training_conversations(config, 1, np.random.default_rng(0), 3)
    items = [RankItem(i, image=im) for i, im in enumerate(images)]
    result = ranker.rank(ToyProfile.of(HISTORY).text(), items, seed=0)
    assert sorted(s.item_id for s in result.scores) == [0, 1, 2]


def test_vision_pretraining_points_images_to_their_words_at_the_norm_of_the_tokens():
    config = ToyRankerVLMConfig(vision_pretrain_steps=60, text_hidden_size=32, text_layers=1)
    model, processor = toy_ranker_vlm(config)
    pretrain_vision_on_words(model, processor, config, progress=False)
    rng = np.random.default_rng(3)
    attributes = draw_attributes(256, rng)
    with torch.no_grad():
        pixels = processor.image_processor([render_image(a, rng, 16) for a in attributes], return_tensors="pt")
        images = model.get_image_features(**pixels).pooler_output  # per image, its one patch's LM embedding
        images = torch.cat(list(images)).reshape(len(attributes), -1)
        words = model.get_input_embeddings().weight
        numbers = words[processor.tokenizer.convert_tokens_to_ids([str(n) for n in range(1000)])]
    assert images.norm(dim=-1).mean().item() == pytest.approx(1.0, rel=0.1)
    assert numbers.norm(dim=-1).mean().item() == pytest.approx(NUMBER_EMBEDDING_SCALE, rel=0.1)
    tokenizer = processor.tokenizer
    # colour and brightness are read within these few steps (the learning benchmark prints all four after training)
    for a, (pos, neg) in (
        (a, ATTRIBUTES[name]) for a, name in enumerate(ATTRIBUTES) if name in ("colour", "brightness")
    ):
        direction = (
            words[tokenizer.convert_tokens_to_ids(f" {pos}")] - words[tokenizer.convert_tokens_to_ids(f" {neg}")]
        )
        right = ((images @ direction > 0).numpy() == (attributes[:, a] > 0)).mean()
        assert right > 0.9, (pos, neg, right)


def test_training_keeps_the_vision_side_and_the_attribute_words_as_pretrained():
    config = ToyRankerVLMConfig(
        vision_pretrain_steps=2, train_steps=3, batch_size=2, text_hidden_size=32, text_layers=1
    )
    model, processor = toy_ranker_vlm(config)
    pretrain_vision_on_words(model, processor, config, progress=False)
    tokenizer = processor.tokenizer
    attribute_words = tokenizer.convert_tokens_to_ids(
        [f" {w}" for pair in ATTRIBUTES.values() for w in pair] + ["circle", "square"]
    )
    other_words = tokenizer.convert_tokens_to_ids(["42", '", "similarity_score": ', "+"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    words_before = model.get_input_embeddings().weight.detach().clone()
    train_toy_ranker_vlm(model, processor, replace(config, vision_pretrain_steps=0), progress=False)
    for name, p in model.named_parameters():
        vision = name.startswith(("model.vision_tower.", "model.multi_modal_projector."))
        assert torch.equal(p, before[name]) == vision, name
    words = model.get_input_embeddings().weight
    assert torch.equal(words[attribute_words], words_before[attribute_words])
    assert not torch.equal(words[other_words], words_before[other_words])


def test_training_uses_one_thread_and_decays_the_learning_rate_to_zero(monkeypatch):
    config = ToyRankerVLMConfig(
        vision_pretrain_steps=2, train_steps=40, batch_size=2, text_hidden_size=32, text_layers=1
    )
    model, processor = toy_ranker_vlm(config)
    rates, threads = [], []
    step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_toy_ranker_vlm(
            model, processor, config, progress=False, callback=lambda *_: threads.append(torch.get_num_threads())
        )
        assert torch.get_num_threads() == 2  # the caller's count is restored
    finally:
        torch.set_num_threads(outer)
    assert threads == [1] * 40
    rates = rates[-40:]  # the conversation steps (vision pre-training has its own optimizer)
    warmup = 40 // 20
    expected = [config.learning_rate * (s / warmup if s < warmup else (40 - s) / (40 - warmup)) for s in range(40)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12, atol=1e-15)


def test_rank_batch_samples_trials_at_the_configured_temperature():
    class Recorder:
        def __init__(self):
            self.calls = []

        def generate(self, requests, sample_seed=None, show_progress=False, temperature=0.7):
            self.calls.append((sample_seed, temperature))
            return ['[{"image_id": 0, "similarity_score": 50}, {"image_id": 1, "similarity_score": 40}]'] * len(
                requests
            )

    items = [RankItem(0, text="a"), RankItem(1, text="b")]
    for temperature, sampled in ((0.0, False), (0.9, True)):
        backend = Recorder()
        pipeline = VLMRankerPipeline(
            backend=backend, config=RankerConfig(k_subset=2, n_trials=2, temperature=temperature)
        )
        pipeline.rank("likes red", items, seed=3)
        (seed, used), *_ = backend.calls
        assert (seed is not None) == sampled and (not sampled or used == 0.9)
    assert Recorder().generate([]) == []


@pytest.fixture(scope="module")
def small_benchmark(tmp_path_factory) -> dict:
    """The learning benchmark's results at `--small`, by name (run once for the slow tests below)."""
    path = Path(__file__).parents[2] / "benchmarks" / "learn_ranker.py"
    spec = importlib.util.spec_from_file_location("learn_ranker", path)
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    results = benchmark.main(["--small", "--output-dir", str(tmp_path_factory.mktemp("learn_ranker"))])
    return {r.name: r for r in results}


TOY_VLM_STABILITY = "stability_toy_vlm_rank_std"


@pytest.mark.slow
def test_learning_benchmark_passes_at_a_small_size(small_benchmark):
    assert TOY_VLM_STABILITY in small_benchmark
    failed = [str(r) for name, r in small_benchmark.items() if not r.passed and name != TOY_VLM_STABILITY]
    assert not failed, failed


@pytest.mark.slow
def test_randomized_scoring_stabilises_the_toy_vlm_at_a_small_size(small_benchmark):
    assert small_benchmark[TOY_VLM_STABILITY].passed, str(small_benchmark[TOY_VLM_STABILITY])
