"""Robust extraction of `{id, similarity_score, explanation}` objects from free-form VLM output.

Real VLM output wraps JSON in code fences and prose, uses single quotes, leaves trailing commas, returns one
object, several objects or a list, gives scores as strings ("85", "85/100", "85%") or out of [0, 100], and
mentions ids that were never asked about. `parse_scores` returns what it can use plus a list of problems and
never raises on model output.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class ParsedScores:
    """Scores per candidate id (first valid object wins), explanations, and what went wrong."""

    scores: dict[str, float] = field(default_factory=dict)
    explanations: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _objects(text: str) -> Iterable[str]:
    """Balanced `{...}` substrings (outermost), in order; strings in double quotes are respected."""
    depth, start, in_string, escaped = 0, None, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                yield text[start : i + 1]


def _load(candidate: str) -> dict[str, Any] | None:
    attempts = [candidate, _TRAILING_COMMA.sub(r"\1", candidate)]
    attempts.append(_TRAILING_COMMA.sub(r"\1", candidate.replace("'", '"')))
    for attempt in attempts:
        try:
            value = json.loads(attempt.replace("\\_", "_"))
        except (json.JSONDecodeError, ValueError):
            continue
        return value if isinstance(value, dict) else None
    return None


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        match = _NUMBER.search(value)
        return float(match.group()) if match else None
    return None


def parse_scores(text: str, candidate_ids: Iterable[Any], id_key: str = "image_id") -> ParsedScores:
    """Parse VLM output into scores for the given candidates.

    Args:
        text: Raw model output.
        candidate_ids: The ids that were asked about (compared as strings).
        id_key: The id field name (`"image_id"` or `"version_id"`); `"id"` is accepted too.

    Returns:
        `ParsedScores`; scores are clipped to [0, 100] (with a problem noted).

    Example:
        ```python
        >>> from imagegem_hf.ranker.parsing import parse_scores
        >>> out = parse_scores("Sure! ```json\\n[{'image_id': 7, 'similarity_score': '85/100',}]\\n```", [7, 8])
        >>> out.scores, out.problems
        ({'7': 85.0}, ['no score for candidate 8'])
        ```
    """
    wanted = [str(c) for c in candidate_ids]
    result = ParsedScores()
    if not isinstance(text, str):
        result.problems.append(f"output is not text ({type(text).__name__})")
        text = ""
    cleaned = _FENCE.sub(" ", text)
    for raw in _objects(cleaned):
        obj = _load(raw)
        if obj is None:
            result.problems.append(f"unparseable object {raw[:60]!r}")
            continue
        item_id = next((obj[k] for k in (id_key, "id", "image_id", "version_id") if k in obj), None)
        if item_id is None:
            result.problems.append("object without an id")
            continue
        item_id = str(item_id).strip()
        if item_id.endswith(".0"):
            item_id = item_id[:-2]
        if item_id not in wanted:
            result.problems.append(f"id {item_id!r} was not among the candidates")
            continue
        score = _score(obj.get("similarity_score", obj.get("score")))
        if score is None:
            result.problems.append(f"no usable similarity_score for {item_id}")
            continue
        if not 0.0 <= score <= 100.0:
            result.problems.append(f"score {score} for {item_id} clipped to [0, 100]")
            score = min(max(score, 0.0), 100.0)
        if item_id in result.scores:
            result.problems.append(f"duplicate object for {item_id}; the first is kept")
            continue
        result.scores[item_id] = score
        explanation = obj.get("explanation", "")
        result.explanations[item_id] = explanation if isinstance(explanation, str) else str(explanation)
    result.problems += [f"no score for candidate {c}" for c in wanted if c not in result.scores]
    return result
