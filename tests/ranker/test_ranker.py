import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imagegem_hf.ranker import RankerConfig, RankItem, VLMRankerPipeline, parse_scores, trial_subsets
from imagegem_hf.ranker.two_stage import rank_metrics, rerank_and_evaluate
from imagegem_hf.testing import random_images, tiny_vlm


class ScriptedVLM(torch.nn.Module):
    """A stand-in VLM: reads the candidate ids in its prompt and answers with planned JSON.

    `plan(item_id, position_in_prompt, call_index)` gives the score; `garbage_calls` are answered with prose.
    """

    def __init__(self, tokenizer, plan, garbage_calls=()):
        super().__init__()
        self.tokenizer, self.plan, self.garbage_calls = tokenizer, plan, set(garbage_calls)
        self.calls, self.prompts = 0, []
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, **kwargs):
        replies = []
        for row in input_ids:
            prompt = self.tokenizer.decode(row, skip_special_tokens=True)
            self.prompts.append(prompt)
            ids = re.findall(r"(?:image_id|version_id): (\w+)\.", prompt)
            if self.calls in self.garbage_calls:
                reply = "I cannot rank these images."
            elif not ids:
                reply = "Likes red cars and sunsets."
            else:
                reply = json.dumps(
                    [
                        {"image_id": i, "similarity_score": self.plan(i, p, self.calls), "explanation": f"because {i}"}
                        for p, i in enumerate(ids)
                    ]
                )
            replies.append(self.tokenizer(reply, add_special_tokens=False).input_ids)
            self.calls += 1
        width = max(len(r) for r in replies)
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in replies])
        return torch.cat([input_ids, new], dim=1)


def scripted_pipeline(plan, garbage_calls=(), **config):
    _, processor = tiny_vlm()
    model = ScriptedVLM(processor.tokenizer, plan, garbage_calls)
    return VLMRankerPipeline(model, processor, RankerConfig(**config)), model


def candidates(n, with_images=True):
    images = random_images(n, size=16)
    return [RankItem(f"c{i}", image=images[i] if with_images else None, text=f"prompt {i}") for i in range(n)]


REALISTIC_OUTPUTS = [
    ('```json\n{"image_id": "c1", "similarity_score": 82.5, "explanation": "x"}\n```', {"c1": 82.5}),
    (
        "Here you go: [{'image_id': 'c1', 'similarity_score': '70',}, {'image_id': 'c2', 'similarity_score': 40}]",
        {"c1": 70.0, "c2": 40.0},
    ),
    (
        '{"image\\_id": "c2", "similarity\\_score": "91/100"} and also {"image_id": "c1", "similarity_score": 5}',
        {"c2": 91.0, "c1": 5.0},
    ),
    ('{"id": "c1", "similarity_score": 130}', {"c1": 100.0}),
    ('{"image_id": "zz", "similarity_score": 50} {"image_id": "c1"}', {}),
    ("no json at all", {}),
    ('{"image_id": "c1", "similarity_score": 60} {"image_id": "c1", "similarity_score": 10}', {"c1": 60.0}),
    ('{"image_id": "c1", "similarity_score": 60', {}),
]


@pytest.mark.parametrize("text, expected", REALISTIC_OUTPUTS)
def test_parser_on_realistic_malformed_outputs(text, expected):
    result = parse_scores(text, ["c1", "c2"])
    assert result.scores == expected
    assert all(f"no score for candidate {c}" in result.problems for c in ("c1", "c2") if c not in expected)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.lists(st.integers(0, 50), max_size=5))
def test_parser_never_raises_on_arbitrary_text(text, ids):
    result = parse_scores(text, ids)
    assert all(0 <= s <= 100 for s in result.scores.values())
    assert set(result.scores) <= {str(i) for i in ids}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9), st.floats(-1e3, 1e3, allow_nan=False)), min_size=1, max_size=6),
    st.sampled_from(["fence", "prose", "single", "trailing"]),
)
def test_parser_recovers_mangled_json(pairs, mangling):
    objects = [{"image_id": i, "similarity_score": round(s, 2), "explanation": "ok"} for i, s in pairs]
    text = json.dumps(objects)
    if mangling == "fence":
        text = f"```json\n{text}\n```"
    elif mangling == "prose":
        text = f"Sure, here are the scores: {text} Hope this helps!"
    elif mangling == "single":
        text = text.replace('"', "'")
    else:
        text = text.replace("}", ",}")
    expected = {}
    for i, s in pairs:
        expected.setdefault(str(i), min(max(round(s, 2), 0.0), 100.0))
    assert parse_scores(text, range(10)).scores == expected


def test_trial_subsets_cover_every_candidate_without_repeats_inside_a_trial():
    rng = np.random.default_rng(0)
    for m, k, t in [(10, 5, 2), (10, 3, 4), (7, 7, 3), (5, 8, 2)]:
        subsets = trial_subsets(m, k, t, rng)
        assert len(subsets) == t and all(len(set(s)) == len(s) == min(k, m) for s in subsets)
        if k * t >= m:
            assert set().union(*subsets) == set(range(m))


def test_randomized_scoring_is_the_mean_over_trials_and_deterministic():
    # A position-dependent plan makes scores differ across trials, so the mean is a real expectation.
    def plan(item_id, position, call):
        return 10.0 * int(item_id[1:]) + position

    pipeline, model = scripted_pipeline(plan, k_subset=3, n_trials=6, max_new_tokens=400)
    cands = candidates(6)
    result = pipeline.rank("profile", cands, seed=3)
    # Recompute the expectation independently from the trial subsets the same seed draws.
    subsets = trial_subsets(6, 3, 6, np.random.default_rng(3))
    for score in result.scores:
        index = int(score.item_id[1:])
        positions = [s.index(index) for s in subsets if index in s]
        assert score.n_trials == len(positions)
        assert score.mean == pytest.approx(np.mean([10.0 * index + p for p in positions]))
        assert score.places == positions
        assert score.values == [10.0 * index + p for p in positions]
    assert result.ranking == ["c5", "c4", "c3", "c2", "c1", "c0"]
    assert pipeline.rank("profile", cands, seed=3).ranking == result.ranking
    assert result.scores[0].explanations[0] == "because c5"


def test_unparseable_trials_are_retried_and_unscored_items_rank_last():
    pipeline, model = scripted_pipeline(
        lambda i, p, c: 50.0,
        garbage_calls={0},
        k_subset=2,
        n_trials=2,
        max_retries=1,
        batch_size=1,
        max_new_tokens=300,
    )
    result = pipeline.rank("profile", candidates(4), seed=0)
    assert all(s.n_trials == 1 for s in result.scores)  # trial 0 failed once, then succeeded on retry
    assert model.calls == 3
    pipeline, _ = scripted_pipeline(
        lambda i, p, c: 50.0,
        garbage_calls={0, 2},
        k_subset=2,
        n_trials=2,
        max_retries=1,
        batch_size=1,
        max_new_tokens=300,
    )
    result = pipeline.rank("profile", candidates(4), seed=0)
    unscored = [s.item_id for s in result.scores if s.n_trials == 0]
    assert len(unscored) == 2 and result.ranking[-2:] == unscored
    assert any("no score" in p for p in result.problems)


def test_candidates_a_trial_left_unscored_are_asked_about_again_alone():
    # call 0 (trial 0: 3 candidates) skips its second candidate; its retry (call 2) is asked about that one only
    skipped = {}

    def plan(item_id, position, call):
        if call == 0 and position == 1:
            skipped["id"] = item_id
            return None
        return 10.0 * int(item_id[1:]) + call

    pipeline, model = scripted_pipeline(plan, k_subset=3, n_trials=2, max_retries=1, batch_size=1, max_new_tokens=400)
    result = pipeline.rank("profile", candidates(6), seed=0)
    assert model.calls == 3
    assert re.findall(r"image_id: (\w+)\.", model.prompts[2]) == [skipped["id"]]
    by_id = {s.item_id: s for s in result.scores}
    assert all(s.n_trials == 1 for s in result.scores)
    assert by_id[skipped["id"]].mean == 10.0 * int(skipped["id"][1:]) + 2  # the retry's score
    assert not any("no score" in p for p in result.problems)
    pipeline, model = scripted_pipeline(plan, k_subset=3, n_trials=2, max_retries=0, batch_size=1, max_new_tokens=400)
    result = pipeline.rank("profile", candidates(6), seed=0)
    assert model.calls == 2 and [s.item_id for s in result.scores if s.n_trials == 0] == [skipped["id"]]
    assert f"no score for candidate {skipped['id']}" in result.problems


def test_a_retried_candidate_records_its_place_in_the_retry_prompt():
    # call 0 (trial 0: 4 candidates) skips its first and third; the retry shows those two alone, at places 0 and 1
    skipped = []

    def plan(item_id, position, call):
        if call == 0 and position in (0, 2):
            skipped.append(item_id)
            return None
        return 10.0 * int(item_id[1:]) + position  # the place the model read the candidate at, in the score

    pipeline, model = scripted_pipeline(plan, k_subset=4, n_trials=2, max_retries=1, batch_size=1, max_new_tokens=500)
    result = pipeline.rank("profile", candidates(8), seed=0)
    assert model.calls == 3 and re.findall(r"image_id: (\w+)\.", model.prompts[2]) == skipped
    by_id = {s.item_id: s for s in result.scores}
    assert [by_id[i].places for i in skipped] == [[0], [1]]
    for score in result.scores:
        assert [v - 10.0 * int(score.item_id[1:]) for v in score.values] == score.places


def test_caption_is_cached_per_user():
    pipeline, model = scripted_pipeline(lambda i, p, c: 1.0)
    history = candidates(2)
    first = pipeline.caption("u1", history)
    assert first == "Likes red cars and sunsets." and model.calls == 1
    assert pipeline.caption("u1", history) == first and model.calls == 1
    pipeline.caption("u2", history)
    assert model.calls == 2
    with pytest.raises(ValueError, match="no history"):
        pipeline.caption("u3", [])


def test_two_stage_metrics_by_hand():
    payload = {
        "model_name": "SASRec",
        "rankings": {"a": ["c0", "c1", "c2", "c3"], "b": ["c3", "c2", "c1", "c0"], "z": ["c0", "c1"]},
        "histories": {"a": ["c9"], "b": ["c8"], "z": ["c7"]},
        "targets": {"a": "c2", "b": "c0", "z": "c5"},  # z's target is not among the candidates: skipped
    }
    pipeline, _ = scripted_pipeline(lambda i, p, c: 10.0 * int(i[1:]), k_subset=4, n_trials=1, max_new_tokens=400)
    images = {f"c{i}": im for i, im in enumerate(random_images(10, size=16))}
    report = rerank_and_evaluate(
        payload, pipeline, lambda i: RankItem(i, image=images[i]), top_m=4, show_progress=False
    )
    assert report.cf_ranks == {"a": 3, "b": 4}
    assert report.vlm_ranks == {"a": 2, "b": 4}  # the VLM orders c3, c2, c1, c0 for both users
    assert rank_metrics([2, 4])["ndcg@5"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / 2)
    assert "| SASRec | 3.50 | 0.50 | 1.0000 |" in report.table()
    assert report.stability["top1_agreement"] == 1.0 and report.stability["kendall_tau_between_seeds"] == 1.0


def test_tiny_vlm_end_to_end_and_save_load(tmp_path):
    model, processor = tiny_vlm()
    pipeline = VLMRankerPipeline(model, processor, RankerConfig(max_new_tokens=8, k_subset=2, n_trials=2))
    cands = candidates(3)
    result = pipeline.rank(pipeline.caption("u", candidates(2)), cands, seed=0)
    assert sorted(result.ranking) == ["c0", "c1", "c2"]  # noise output: unscored, kept in input order
    pipeline.save_pretrained(tmp_path / "ranker")
    loaded = VLMRankerPipeline.from_pretrained(tmp_path / "ranker")
    assert loaded.config == pipeline.config and loaded.templates == pipeline.templates
    content = [{"type": "image"}, {"type": "text", "text": "hi"}]
    assert loaded.generate([(content, random_images(1, size=16))]) == pipeline.generate(
        [(content, random_images(1, size=16))]
    )
    with pytest.raises(ValueError, match="item_type"):
        VLMRankerPipeline(model, processor, RankerConfig(item_type="video"))


def test_recommend_cli_reranks_with_a_saved_vlm(tmp_path, capsys):
    from imagegem_hf.cli import main

    raw, ds, vlm_dir = tmp_path / "raw", tmp_path / "ds", tmp_path / "vlm"
    assert main(["dataset", "synth", str(raw), "--users", "40", "--seed", "2"]) == 0
    assert main(["dataset", "build", str(raw), str(ds)]) == 0
    model, processor = tiny_vlm()
    model.save_pretrained(vlm_dir)
    processor.save_pretrained(vlm_dir)
    capsys.readouterr()
    args = [
        "recommend",
        str(ds),
        "--item-type",
        "model",
        "--models",
        "pop,itemknn",
        "--k",
        "1,5",
        "--output-dir",
        str(tmp_path / "out"),
        "--rerank",
        "vlm",
        "--vlm",
        str(vlm_dir),
        "--rerank-model",
        "itemknn",
        "--trials",
        "2",
        "--subset-size",
        "3",
        "--rerank-users",
        "3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| VLM |" in out and (tmp_path / "out" / "rerank_model.json").exists()
    assert main(args[:-12] + ["--rerank", "vlm"]) == 2  # no --vlm given


def test_caption_batch_returns_an_empty_profile_instead_of_failing():
    class EmptyReplies:
        def generate(self, requests, sample_seed=None, show_progress=False, temperature=0.7):
            return [""] * len(requests)

    pipeline = VLMRankerPipeline(backend=EmptyReplies())
    items = [RankItem(1, text="a red car")]
    assert pipeline.caption_batch([("u1", items), ("u2", items)]) == ["", ""]
    assert pipeline.caption("u1", items) == ""  # cached: an empty reply is still the VLM's answer
    result = pipeline.rank("", [RankItem(2, text="x")])
    assert result.scores[0].n_trials == 0 and result.problems


def test_save_model_makes_a_ranker_folder_that_stands_on_its_own(tmp_path):
    import shutil

    model, processor = tiny_vlm()
    vlm_dir = tmp_path / "vlm"
    model.save_pretrained(vlm_dir)
    processor.save_pretrained(vlm_dir)
    pipeline = VLMRankerPipeline.from_pretrained(vlm_dir, max_new_tokens=4)
    pipeline.save_pretrained(tmp_path / "by_reference")  # default: the folder points at the VLM's path
    pipeline.save_pretrained(tmp_path / "standalone", save_model=True)
    shutil.rmtree(vlm_dir)
    with pytest.raises(OSError):
        VLMRankerPipeline.from_pretrained(tmp_path / "by_reference")
    loaded = VLMRankerPipeline.from_pretrained(tmp_path / "standalone")
    assert loaded.config == pipeline.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert "(weights saved in this folder)" in (tmp_path / "standalone" / "README.md").read_text()
