"""Robust extraction of `{id, similarity_score, explanation}` objects from free-form VLM output.

Real VLM output wraps JSON in code fences and prose, uses single quotes and Python literals (`True`, `None`),
leaves trailing commas, returns one object, several objects, a list or a wrapper object (`{"rankings": [...]}`),
gives scores as strings ("85", "8.5e1", "85/100", "8.5/10", "85%") or out of [0, 100], and mentions ids that were
never asked about. `parse_scores` returns what it can use plus a list of problems and never raises on model
output, whatever its size or nesting: it reads at most `MAX_OUTPUT_CHARS` characters and `MAX_OBJECTS` objects,
skips objects nested deeper than `MAX_NESTING` levels and lists at most `MAX_PROBLEMS` problems, so that its time
and memory are bounded for any input (a ranking reply for ten candidates is about 2,000 characters).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_OUTPUT_CHARS = 100_000
"""Characters of an output that are read; the rest is ignored (with a problem noted)."""
MAX_OBJECTS = 1_000
"""Top-level `{...}` objects of an output that are read."""
MAX_NESTING = 32
"""Objects whose brackets nest deeper than this are skipped unparsed (real replies nest 2-3 levels)."""
MAX_PROBLEMS = 50
"""Problems listed per output; further ones are counted in a last entry."""

_ID_KEYS = ("id", "image_id", "version_id")
_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
# Characters that matter when delimiting objects: braces, double quotes (strings inside objects) and backslashes.
_DELIMITERS = re.compile(r'[{}"\\]')
_NESTING = re.compile(r'[{}\[\]"\\]')
# One token of JSON-like text: a double-quoted string, a single-quoted string (an apostrophe inside it is a quote
# not followed by `, } ] :`), a Python literal, or a trailing comma. Used to turn Python-style objects into JSON.
_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"'
    r"|'((?:[^'\\]|\\.|'(?!\s*[,}\]:]))*)'"
    r"|\b(True|False|None)\b"
    r"|,(?=\s*[}\]])",
    re.DOTALL,
)
_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SCORE = re.compile(rf"({_NUMBER})\s*(?:/\s*({_NUMBER}))?")


@dataclass
class ParsedScores:
    """Scores per candidate id (first valid object wins), explanations, and what went wrong."""

    scores: dict[str, float] = field(default_factory=dict)
    explanations: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class _Problems:
    """The first `MAX_PROBLEMS` problems, and a count of the rest."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.unlisted = 0

    def add(self, problem: str) -> None:
        if len(self.listed) < MAX_PROBLEMS:
            self.listed.append(problem)
        else:
            self.unlisted += 1

    def as_list(self) -> list[str]:
        if self.unlisted:
            return [*self.listed, f"{self.unlisted} more problems not listed"]
        return list(self.listed)


def _object_spans(text: str) -> list[tuple[int, int]]:
    """`(start, end)` of the maximal balanced `{...}` substrings, in order, in one linear pass.

    Double-quoted strings are respected inside objects only: a quote in prose (`a 12" vinyl`) does not hide the
    objects after it. An object that never closes does not hide the complete objects inside it.
    """
    spans: list[tuple[int, int]] = []
    opened: list[int] = []
    in_string, skip_to = False, 0
    for match in _DELIMITERS.finditer(text):
        i = match.start()
        if i < skip_to:
            continue
        ch = match.group()
        if in_string:
            if ch == "\\":
                skip_to = i + 2
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = bool(opened)
        elif ch == "{":
            opened.append(i)
        elif ch == "}" and opened:
            start = opened.pop()
            while spans and spans[-1][0] > start:  # objects inside this one
                spans.pop()
            spans.append((start, i + 1))
    return spans


def _nesting(text: str) -> int:
    """Deepest bracket (`{}` and `[]`) nesting of `text` outside double-quoted strings."""
    depth = deepest = 0
    in_string, skip_to = False, 0
    for match in _NESTING.finditer(text):
        i = match.start()
        if i < skip_to:
            continue
        ch = match.group()
        if in_string:
            if ch == "\\":
                skip_to = i + 2
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}]":
            depth = max(depth - 1, 0)
    return deepest


def _as_json(match: re.Match) -> str:
    token = match.group()
    if token.startswith('"'):
        return token
    if match.group(2):
        return _PYTHON_LITERALS[match.group(2)]
    if token.startswith("'"):
        return '"' + match.group(1).replace("\\'", "'").replace('"', '\\"') + '"'
    return ""  # a trailing comma


def _load(candidate: str) -> Any:
    """The JSON value of `candidate`, read as JSON, then as Python-style JSON; `None` if neither parses."""
    for attempt in (candidate, _TOKEN.sub(_as_json, candidate)):
        try:
            return json.loads(attempt)
        except (ValueError, RecursionError):  # JSONDecodeError, integers beyond the digit limit
            continue
    return None


def _records(value: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    """The objects of `value` that carry an id: itself, or those in a wrapper (`{"rankings": [...]}`)."""
    if isinstance(value, dict):
        if any(key in value for key in _ID_KEYS):
            yield value
            return
        children = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return
    if depth < 3:
        for child in children:
            yield from _records(child, depth + 1)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _score(value: Any) -> float | None:
    """A number, or a string holding one: "85", "8.5e1", "85%", or a fraction "85/100", "8.5/10" (scaled to 100)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, str):
        match = _SCORE.search(value[:100])
        if match is None:
            return None
        number = float(match.group(1))
        if match.group(2) is not None:
            denominator = float(match.group(2))
            if denominator <= 0 or not math.isfinite(denominator):
                return None
            number = 100.0 * number / denominator
        return _finite(number)
    return None


def _item_id(record: dict[str, Any], id_key: str) -> str | None:
    value = next((record[k] for k in (id_key, *_ID_KEYS) if k in record), None)
    if value is None:
        return None
    item_id = str(value).strip()
    return item_id[:-2] if item_id.endswith(".0") else item_id


def parse_scores(text: str, candidate_ids: Iterable[Any], id_key: str = "image_id") -> ParsedScores:
    """Parse VLM output into scores for the given candidates; never raises on model output.

    Args:
        text: Raw model output (only its first `MAX_OUTPUT_CHARS` characters are read).
        candidate_ids: The ids that were asked about (compared as strings).
        id_key: The id field name (`"image_id"` or `"version_id"`); `"id"` is accepted too.

    Returns:
        `ParsedScores`; scores are clipped to [0, 100] (with a problem noted), at most `MAX_PROBLEMS` problems are
        listed (then a count of the rest).

    Example:
        ```python
        >>> from imagegem_hf.ranker.parsing import parse_scores
        >>> out = parse_scores("Sure! ```json\\n[{'image_id': 7, 'similarity_score': '85/100',}]\\n```", [7, 8])
        >>> out.scores, out.problems
        ({'7': 85.0}, ['no score for candidate 8'])
        ```
    """
    wanted = list(dict.fromkeys(str(c) for c in candidate_ids))
    wanted_set = set(wanted)
    result, problems = ParsedScores(), _Problems()
    if not isinstance(text, str):
        problems.add(f"output is not text ({type(text).__name__})")
        text = ""
    if len(text) > MAX_OUTPUT_CHARS:
        problems.add(f"output of {len(text):,} characters: only the first {MAX_OUTPUT_CHARS:,} were read")
        text = text[:MAX_OUTPUT_CHARS]
    cleaned = _FENCE.sub(" ", text).replace("\\_", "_")
    spans = _object_spans(cleaned)
    if len(spans) > MAX_OBJECTS:
        problems.add(f"{len(spans):,} objects in the output: only the first {MAX_OBJECTS:,} were read")
    for start, end in spans[:MAX_OBJECTS]:
        raw = cleaned[start:end]
        if _nesting(raw) > MAX_NESTING:
            problems.add(f"object nested deeper than {MAX_NESTING} levels skipped {raw[:60]!r}")
            continue
        value = _load(raw)
        if value is None:
            problems.add(f"unparseable object {raw[:60]!r}")
            continue
        records = list(_records(value))
        if not records:
            problems.add("object without an id")
            continue
        for record in records:
            item_id = _item_id(record, id_key)
            if item_id is None:
                problems.add("object without an id")
                continue
            if item_id not in wanted_set:
                problems.add(f"id {item_id[:60]!r} was not among the candidates")
                continue
            score = _score(record.get("similarity_score", record.get("score")))
            if score is None:
                problems.add(f"no usable similarity_score for {item_id}")
                continue
            if not 0.0 <= score <= 100.0:
                problems.add(f"score {score} for {item_id} clipped to [0, 100]")
                score = min(max(score, 0.0), 100.0)
            if item_id in result.scores:
                problems.add(f"duplicate object for {item_id}; the first is kept")
                continue
            result.scores[item_id] = score
            explanation = record.get("explanation", "")
            result.explanations[item_id] = explanation if isinstance(explanation, str) else str(explanation)
    for candidate in wanted:
        if candidate not in result.scores:
            problems.add(_missing(candidate))
    result.problems = problems.as_list()
    return result


def _missing(candidate: str) -> str:
    return f"no score for candidate {candidate}"


def merge_retry(first: ParsedScores, retry: ParsedScores) -> ParsedScores:
    """A trial's parse completed by a retry's: the retry's scores of candidates the first left unscored.

    The problems are the first parse's, less the "no score" of candidates the retry scored, then the retry's own
    (its "no score" lines are already among the first's).

    Example:
        ```python
        >>> from imagegem_hf.ranker.parsing import merge_retry, parse_scores
        >>> first = parse_scores('{"image_id": 7, "similarity_score": 85}', [7, 8])
        >>> merged = merge_retry(first, parse_scores('{"image_id": 8, "similarity_score": 20}', [8]))
        >>> merged.scores, merged.problems
        ({'7': 85.0, '8': 20.0}, [])
        ```
    """
    new = {k: v for k, v in retry.scores.items() if k not in first.scores}
    explanations = {**first.explanations, **{k: retry.explanations.get(k, "") for k in new}}
    solved = {_missing(k) for k in new}
    problems = [p for p in first.problems if p not in solved]
    problems += [p for p in retry.problems if not p.startswith(_missing(""))]
    return ParsedScores(scores={**first.scores, **new}, explanations=explanations, problems=problems)
