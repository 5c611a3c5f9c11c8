"""parse_scores on hostile and sloppy VLM output: deep nesting, huge outputs, stray quotes, string and
Python-style values; `VLMRankerPipeline.rank` survives them."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imagegem_hf.ranker import RankerConfig, VLMRankerPipeline, parse_scores
from imagegem_hf.ranker.parsing import MAX_NESTING, MAX_OBJECTS, MAX_OUTPUT_CHARS, MAX_PROBLEMS
from imagegem_hf.testing import tiny_vlm

from .test_ranker import candidates

C2 = '{"image_id": "c2", "similarity_score": 40}'


def _deep(depth: int) -> str:
    """An object whose `x` field nests `depth` lists: the smallest `RecursionError` of `json.loads` is ~992."""
    return '{"image_id": "c1", "similarity_score": 70, "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [992, 5_000, 45_000])
def test_deep_nesting_is_skipped_not_raised(depth):
    result = parse_scores(f"{_deep(depth)} {C2}", ["c1", "c2"])
    assert result.scores == {"c2": 40.0}  # the object after the deep one is still read
    assert any(f"nested deeper than {MAX_NESTING} levels" in p for p in result.problems)
    assert "no score for candidate c1" in result.problems


def test_nesting_up_to_the_limit_is_read():
    result = parse_scores(_deep(MAX_NESTING - 1), ["c1"])
    assert result.scores == {"c1": 70.0}


def test_huge_outputs_are_read_up_to_a_bound_with_a_bounded_problem_list():
    many_tiny = '{"image_id": "c1", "similarity_score": 70}' + '{"id": "zz"}' * 200_000  # 2.4 MB
    result = parse_scores(many_tiny, ["c1"])
    assert result.scores == {"c1": 70.0}
    assert len(result.problems) == MAX_PROBLEMS + 1
    assert (
        result.problems[0] == f"output of {len(many_tiny):,} characters: only the first {MAX_OUTPUT_CHARS:,} were read"
    )
    assert f"only the first {MAX_OBJECTS:,} were read" in result.problems[1]
    assert result.problems[-1].endswith("more problems not listed")
    # An object beyond the character bound is not read.
    late = "x" * MAX_OUTPUT_CHARS + C2
    assert parse_scores(late, ["c2"]).scores == {}


@pytest.mark.parametrize(
    "text",
    [
        'I love the 12" vinyl look. {"image_id": "c1", "similarity_score": 70}',
        '{"image_id": "c2", "similarity_score": 40} It is 5" wide. {"image_id": "c1", "similarity_score": 70}',
        'Here { are the scores: {"image_id": "c1", "similarity_score": 70}',  # a stray brace that never closes
    ],
    ids=["quote-before", "quote-between", "unclosed-brace"],
)
def test_stray_quotes_and_braces_in_prose_do_not_hide_objects(text):
    assert parse_scores(text, ["c1"]).scores == {"c1": 70.0}


# Prose with what can derail a scanner (quotes, colons, commas, brackets, non-ASCII), anything but braces.
PROSE = st.text(st.sampled_from("\"\"'':,.[] xé中\n"), max_size=60)


@settings(max_examples=150, deadline=None)
@given(PROSE, PROSE, st.integers(0, 100))
def test_an_object_between_arbitrary_prose_is_always_read(before, after, score):
    text = before + json.dumps({"image_id": "c1", "similarity_score": score, "explanation": "x"}) + after
    assert parse_scores(text, ["c1"]).scores == {"c1": float(score)}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("8.5e1", 85.0),
        ("85%", 85.0),
        ("85/100", 85.0),
        ("8.5/10", 85.0),
        (".5e2", 50.0),
        ("score: 72 out of 100", 72.0),
    ],
)
def test_string_scores(value, expected):
    text = json.dumps({"image_id": "c1", "similarity_score": value})
    assert parse_scores(text, ["c1"]).scores == {"c1": expected}


@pytest.mark.parametrize("value", ['"1e400"', '"5/0"', "1" + "0" * 400, '"NaN"', "Infinity", "true"])
def test_unusable_scores_are_reported_not_raised(value):
    result = parse_scores('{"image_id": "c1", "similarity_score": ' + value + "}", ["c1"])
    assert result.scores == {}
    assert "no usable similarity_score for c1" in result.problems


@pytest.mark.parametrize(
    "text, explanation",
    [
        ("{'image_id': 'c1', 'similarity_score': 70, 'relevant': True, 'note': None}", ""),
        ('{"image_id": "c1", "similarity_score": 70, "relevant": False,}', ""),
        ("{'image_id': 'c1', 'similarity_score': 70, 'explanation': \"the user's taste\"}", "the user's taste"),
        (
            "{'image_id': 'c1', 'similarity_score': 70, 'explanation': 'the user's \"red\" taste'}",
            'the user\'s "red" taste',
        ),
    ],
    ids=["python-literals", "json-false-trailing-comma", "mixed-quotes", "apostrophe-in-single-quotes"],
)
def test_python_style_objects(text, explanation):
    result = parse_scores(text, ["c1"])
    assert result.scores == {"c1": 70.0}
    assert result.explanations["c1"] == explanation


def test_a_wrapper_object_yields_its_records():
    text = json.dumps({"rankings": [{"image_id": "c1", "similarity_score": 70}, json.loads(C2)]})
    assert parse_scores(text, ["c1", "c2"]).scores == {"c1": 70.0, "c2": 40.0}


def test_a_null_id_is_a_problem():
    result = parse_scores('{"image_id": null, "similarity_score": 70}', ["c1"])
    assert result.scores == {} and "object without an id" in result.problems


class FixedReplyVLM(torch.nn.Module):
    """A stand-in VLM that answers every prompt with the same text."""

    def __init__(self, tokenizer, reply: str):
        super().__init__()
        self.reply_ids = tokenizer(reply, add_special_tokens=False).input_ids
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, **kwargs):
        new = torch.tensor([self.reply_ids] * len(input_ids))
        return torch.cat([input_ids, new], dim=1)


def test_rank_survives_a_deeply_nested_reply():
    _, processor = tiny_vlm()
    reply = _deep(992).replace('"c1"', '"c0"') + C2.replace("c2", "c1")
    pipe = VLMRankerPipeline(FixedReplyVLM(processor.tokenizer, reply), processor, RankerConfig(n_trials=1))
    result = pipe.rank("likes red", candidates(2, with_images=False))
    assert result.ranking == ["c1", "c0"]  # c1 scored 40; c0 only in the skipped deep object: unscored, last
    assert result.scores[0].mean == 40.0 and result.scores[1].n_trials == 0
    assert any("nested deeper" in p for p in result.problems)
