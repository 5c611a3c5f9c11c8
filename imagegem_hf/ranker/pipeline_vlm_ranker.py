"""`VLMRankerPipeline`: a VLM writes a user's preference profile, then scores recommendation candidates.

ImageGem §4.2 / appendix B: caption the user's latest items into a textual profile (B.1.1 / B.1.3), score the
collaborative-filtering candidates against it with explanations (B.1.2 / B.1.4), and stabilise the scores by
randomized multi-trial scoring (B.1.5): each trial scores a random k-subset of the candidates in a shuffled
order, and an item's score is the mean over the trials in which it was scored.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagegem_hf.hub import atomic_directory, card_license, hub_repo_id, read_json, render_card, resolve, write_json
from imagegem_hf.ranker.backends import FailedReply, OpenAIChatBackend, TransformersBackend
from imagegem_hf.ranker.parsing import merge_retry, parse_scores
from imagegem_hf.ranker.prompts import RankerTemplates

CONFIG_NAME = "ranker_config.json"


@dataclass
class RankItem:
    """One item shown to the VLM: an image (for images, or a model's example image) and/or text (its prompt)."""

    item_id: Any
    image: Image.Image | None = None
    text: str | None = None


@dataclass
class RankerConfig:
    """Generation and scoring settings of a `VLMRankerPipeline`.

    Attributes:
        item_type: `"image"` or `"model"`: which templates and id field to use.
        k_subset: Candidates scored together in one trial (k in B.1.5).
        n_trials: Trials per user (T in B.1.5).
        max_new_tokens: Generation budget per prompt.
        batch_size: Prompts per `generate` call.
        max_retries: Re-generations (sampled) for the candidates a trial's output left unscored: the trial is
            asked again about those candidates only (all of them when it gave no score at all).
        max_prompt_chars: Item prompts are cut to this many characters.
        temperature: Sampling temperature of the scoring trials; 0 decodes them greedily. Retries of trials that
            left candidates unscored always sample (at this temperature, or at 0.7 when it is 0).
    """

    item_type: str = "image"
    k_subset: int = 5
    n_trials: int = 4
    max_new_tokens: int = 256
    batch_size: int = 8
    max_retries: int = 1
    max_prompt_chars: int = 300
    temperature: float = 0.0


@dataclass
class CandidateScore:
    """An item's aggregated score over the trials that scored it.

    Attributes:
        item_id: The candidate's id.
        mean: Mean of its scores (NaN when no trial scored it).
        std: Their standard deviation.
        n_trials: How many trials scored it.
        explanations: The explanation given with each score.
        values: Each score, in trial order.
        places: Where the candidate stood (from 0) in the prompt that gave each score: its trial's, or for a
            candidate scored by a retry, the retry's own prompt. With `values`, this shows a VLM's position bias.
    """

    item_id: Any
    mean: float
    std: float
    n_trials: int
    explanations: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    places: list[int] = field(default_factory=list)


@dataclass
class RankingResult:
    """Candidates ordered by mean score (unscored ones last, in their input order), and the parsing problems."""

    scores: list[CandidateScore]
    problems: list[str]

    @property
    def ranking(self) -> list[Any]:
        return [s.item_id for s in self.scores]


def trial_subsets(n_candidates: int, k: int, n_trials: int, rng: np.random.Generator) -> list[list[int]]:
    """`n_trials` random subsets of `k` distinct candidate positions, drawn from successive random permutations so
    that every candidate appears before any appears twice (full coverage whenever `k · n_trials ≥ n_candidates`).

    Example:
        ```python
        >>> import numpy as np
        >>> subsets = trial_subsets(10, 5, 2, np.random.default_rng(0))
        >>> sorted(i for s in subsets for i in s) == list(range(10))
        True
        ```
    """
    k = min(k, n_candidates)
    pool: list[int] = []
    subsets = []
    for _ in range(n_trials):
        subset: list[int] = []
        while len(subset) < k:
            if not pool:
                pool = rng.permutation(n_candidates).tolist()
            pick = next((p for p in pool if p not in subset), None)
            if pick is None:  # the fresh pool holds only items already in this subset
                pool = []
                continue
            pool.remove(pick)
            subset.append(pick)
        subsets.append(subset)
    return subsets


class VLMRankerPipeline:
    """Caption a user's history into a preference profile and score candidates with any image-text-to-text VLM.

    Args:
        model: An image-text-to-text model (e.g. Pixtral, Qwen2-VL, Idefics, LLaVA) with `generate`.
        processor: Its processor (with a chat template).
        config: Scoring and generation settings.
        templates: Prompt templates (appendix B by default).
        model_name_or_path: Where the VLM comes from; `save_pretrained` stores this reference instead of the
            weights when it is set.
        backend: Where replies come from instead of `model`/`processor`, e.g. an [`OpenAIChatBackend`] (see
            `from_endpoint`).

    Example:
        ```python
        >>> from imagegem_hf.ranker import VLMRankerPipeline, RankItem
        >>> ranker = VLMRankerPipeline.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")  # doctest: +SKIP
        >>> profile = ranker.caption("user-1", [RankItem(1, image=im) for im in history])  # doctest: +SKIP
        >>> result = ranker.rank(profile, [RankItem(i, image=im) for i, im in candidates], seed=0)  # doctest: +SKIP
        >>> result.ranking  # doctest: +SKIP
        ```
    """

    def __init__(
        self,
        model=None,
        processor=None,
        config: RankerConfig | None = None,
        templates: RankerTemplates | None = None,
        model_name_or_path: str | None = None,
        backend: OpenAIChatBackend | TransformersBackend | None = None,
    ) -> None:
        self.config = config or RankerConfig()
        if backend is None:
            if model is None or processor is None:
                raise ValueError(
                    "Pass a model and its processor, or a backend (e.g. VLMRankerPipeline.from_endpoint)."
                )
            backend = TransformersBackend(model, processor, self.config.batch_size, self.config.max_new_tokens)
        self.backend = backend
        self.model = model
        self.processor = processor
        self.templates = templates or RankerTemplates()
        self.model_name_or_path = model_name_or_path
        self._profiles: dict[tuple[str, str], str] = {}
        self.templates.id_key(self.config.item_type)  # validates item_type

    # -- loading and saving -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str = "cpu",
        **config_overrides,
    ) -> VLMRankerPipeline:
        """Load a saved ranker folder, or any image-text-to-text model repo (default config and templates)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = resolve(path_or_repo_id)
        saved = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else {}
        if saved.get("endpoint"):
            config = RankerConfig(**{**saved.get("config", {}), **config_overrides})
            templates = RankerTemplates(**saved.get("templates", {}))
            return cls.from_endpoint(**saved["endpoint"], config=config, templates=templates)
        source = saved.get("model_name_or_path") or str(folder)
        model_folder = resolve(source) if source != str(folder) else folder
        model = AutoModelForImageTextToText.from_pretrained(model_folder, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(model_folder)
        config = RankerConfig(**{**saved.get("config", {}), **config_overrides})
        templates = RankerTemplates(**saved.get("templates", {}))
        return cls(
            model,
            processor,
            config,
            templates,
            model_name_or_path=saved.get("model_name_or_path") or (str(path_or_repo_id) if not saved else None),
        )

    @classmethod
    def from_endpoint(
        cls,
        base_url: str,
        model: str,
        config: RankerConfig | None = None,
        templates: RankerTemplates | None = None,
        concurrency: int = 16,
        timeout: float = 120.0,
        retries: int = 3,
        **config_overrides,
    ) -> VLMRankerPipeline:
        """A ranker whose VLM is served by an OpenAI-compatible chat-completions endpoint (vLLM, TGI, ...).

        Args:
            base_url: The API root, e.g. `"http://localhost:8000/v1"`.
            model: The served model's name.
            config: Scoring settings (`config_overrides` update it); `batch_size` does not apply, `concurrency`
                bounds the requests in flight instead.
            templates: Prompt templates (appendix B by default).
            concurrency: Requests in flight at once.
            timeout: Seconds to wait for a connection and between bytes of an answer.
            retries: Retries of a request on 429/5xx, timeouts and dropped connections.

        Example:
            ```python
            >>> from imagegem_hf.ranker import VLMRankerPipeline
            >>> # vllm serve Qwen/Qwen2-VL-7B-Instruct --limit-mm-per-prompt image=10
            >>> ranker = VLMRankerPipeline.from_endpoint("http://localhost:8000/v1", "Qwen/Qwen2-VL-7B-Instruct")
            ```
        """
        config = RankerConfig(**{**asdict(config or RankerConfig()), **config_overrides})
        backend = OpenAIChatBackend(
            base_url, model, config.max_new_tokens, concurrency=concurrency, timeout=timeout, retries=retries
        )
        return cls(config=config, templates=templates, backend=backend)

    def save_pretrained(
        self, save_directory: str | os.PathLike, overwrite: bool = True, save_model: bool | None = None
    ) -> Path:
        """Write `ranker_config.json` (config + templates) and a card, and the VLM's weights and processor.

        Args:
            save_directory: The folder (laid out like the Hub repo).
            overwrite: Replace an existing folder written by this library.
            save_model: Whether to save the VLM beside the settings. By default only when the pipeline does not
                know where its VLM comes from (`model_name_or_path`); pass `True` for a self-contained folder
                (e.g. when the VLM was loaded from a local path that the folder's readers will not have).
        """
        if save_model and self.model is None:
            raise ValueError("save_model=True needs an in-process VLM; this pipeline calls an endpoint.")
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            write_json(
                tmp / CONFIG_NAME,
                {
                    "config": asdict(self.config),
                    "templates": self.templates.to_dict(),
                    "model_name_or_path": None if save_model else self.model_name_or_path,
                    "endpoint": self._endpoint(),
                },
            )
            weights_saved = (
                (self.model_name_or_path is None and self.model is not None) if save_model is None else save_model
            )
            if weights_saved:
                self.model.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
            vlm = self.model_name_or_path or (getattr(self.model, "name_or_path", None) or None)
            (tmp / "README.md").write_text(
                render_card(
                    "ranker_card.md",
                    base_model=hub_repo_id(vlm),
                    # settings and templates are Apache-2.0; saved VLM weights keep the VLM's license
                    license=card_license(vlm) if weights_saved else {"license": "apache-2.0"},
                    config=asdict(self.config),
                    templates_version=self.templates.version,
                    model_name_or_path=(None if weights_saved else self.model_name_or_path)
                    or (
                        f"served at {self.backend.base_url}" if self._endpoint() else "(weights saved in this folder)"
                    ),
                )
            )
        return Path(save_directory)

    # -- generation ---------------------------------------------------------------------------------------------
    def _content(self, items: list[RankItem], header: str | None, with_ids: bool) -> tuple[list[dict], list]:
        content: list[dict] = []
        images = []
        id_key = self.templates.id_key(self.config.item_type)
        if header:
            content.append({"type": "text", "text": header})
        for item in items:
            label = f"{id_key}: {item.item_id}. " if with_ids else ""
            if item.image is not None:
                content.append({"type": "text", "text": label})
                content.append({"type": "image"})
                images.append(item.image.convert("RGB"))
                label = ""
            if item.text:
                label += f"Prompt: {item.text[: self.config.max_prompt_chars]}"
            if label:
                content.append({"type": "text", "text": label})
        return content, images

    def _endpoint(self) -> dict[str, Any] | None:
        if not isinstance(self.backend, OpenAIChatBackend):
            return None
        b = self.backend
        return {
            "base_url": b.base_url,
            "model": b.model,
            "concurrency": b.concurrency,
            "timeout": b.timeout,
            "retries": b.retries,
        }

    def generate(
        self,
        requests: list[tuple[list[dict], list]],
        sample_seed: int | None = None,
        show_progress: bool = False,
        temperature: float = 0.7,
    ) -> list[str]:
        """One reply per `(content, images)` request from the backend; greedy unless `sample_seed` is given (then
        sampled at `temperature`). A request that got no answer (an endpoint that failed) gives an empty
        [`FailedReply`] saying why."""
        return self.backend.generate(
            requests, sample_seed=sample_seed, show_progress=show_progress, temperature=temperature
        )

    # -- the two steps ------------------------------------------------------------------------------------------
    def caption(self, user_id: Any, history: list[RankItem]) -> str:
        """The user's textual preference profile from their latest items (cached per user and item type)."""
        return self.caption_batch([(user_id, history)])[0]

    def caption_batch(self, users: list[tuple[Any, list[RankItem]]], show_progress: bool = False) -> list[str]:
        """Profiles of several users, generated together (cached per user and item type). A profile the VLM could
        not write (a failed endpoint request) is an empty [`FailedReply`]; it is not cached, and `rank_batch`
        leaves that user's candidates unscored, in their input order."""
        todo = []
        for user_id, history in users:
            key = (str(user_id), self.config.item_type)
            if key not in self._profiles and key not in {k for k, _ in todo}:
                if not history:
                    raise ValueError(f"User {user_id!r} has no history items to caption.")
                content, images = self._content(history, None, with_ids=False)
                content.append({"type": "text", "text": self.templates.captioning(self.config.item_type)})
                todo.append((key, (content, images)))
        replies = self.generate([request for _, request in todo], show_progress=show_progress) if todo else []
        failed = {}
        for (key, _), reply in zip(todo, replies, strict=True):
            if isinstance(reply, FailedReply):
                failed[key] = reply
            else:
                self._profiles[key] = reply.strip()
        keys = [(str(u), self.config.item_type) for u, _ in users]
        return [self._profiles[key] if key in self._profiles else failed[key] for key in keys]

    def rank(self, profile: str, candidates: list[RankItem], seed: int = 0) -> RankingResult:
        """Randomized multi-trial scoring of `candidates` against `profile` (see `rank_batch`)."""
        return self.rank_batch([(profile, candidates)], seed=seed)[0]

    def rank_batch(
        self, requests: list[tuple[str, list[RankItem]]], seed: int = 0, show_progress: bool = False
    ) -> list[RankingResult]:
        """Score several users' candidates; all trials of all users are generated in shared batches.

        Each user gets `n_trials` random `k_subset`-subsets of their candidates (successive random permutations,
        so every candidate is covered when `k · T ≥ M`), each in a shuffled order; the candidates a trial's output
        leaves unscored (a skipped or misspelt id, an answer cut short, no JSON at all) are asked about again, in a
        prompt of their own, with sampling, up to `max_retries` times. Trials are sampled at `config.temperature`
        (seeded by `seed`) when it is above 0, else decoded greedily.
        """
        rng = np.random.default_rng(seed)
        id_key = self.templates.id_key(self.config.item_type)
        trials = []  # (request index, candidate positions)
        prompts, headers = [], []
        problems: list[list[str]] = [[] for _ in requests]
        for r, (profile, candidates) in enumerate(requests):
            if not candidates:
                raise ValueError("Every ranking request needs at least one candidate.")
            if isinstance(profile, FailedReply):
                problems[r].append(f"no preference profile ({profile.reason}): candidates left unscored")
                continue
            for subset in trial_subsets(len(candidates), self.config.k_subset, self.config.n_trials, rng):
                header = (
                    f"Visual preference profile of the user:\n{profile}\n\n"
                    f"{self.templates.ranking(self.config.item_type)}\n\n{self.templates.multi_candidate_suffix}"
                )
                prompts.append(self._content([candidates[i] for i in subset], header, with_ids=True))
                headers.append(header)
                trials.append((r, subset))
        temperature = self.config.temperature
        sample_seed = 1000 * seed if temperature > 0 else None
        replies = (
            self.generate(prompts, sample_seed=sample_seed, show_progress=show_progress, temperature=temperature)
            if prompts
            else []
        )
        parsed = [
            parse_scores(reply, [requests[r][1][i].item_id for i in subset], id_key)
            for reply, (r, subset) in zip(replies, trials, strict=True)
        ]
        retry_places: dict[tuple[int, str], int] = {}  # (trial, item id) → place in the retry that scored it
        for attempt in range(self.config.max_retries):
            missing = {
                t: [i for i in subset if str(requests[r][1][i].item_id) not in parsed[t].scores]
                for t, (r, subset) in enumerate(trials)
            }
            missing = {t: positions for t, positions in missing.items() if positions}
            if not missing:
                break
            retry_prompts = [  # the trial's prompt, with the candidates it left unscored only
                self._content([requests[trials[t][0]][1][i] for i in positions], headers[t], with_ids=True)
                for t, positions in missing.items()
            ]
            retried = self.generate(
                retry_prompts, sample_seed=1000 * seed + 1 + attempt, temperature=temperature or 0.7
            )
            for (t, positions), reply in zip(missing.items(), retried, strict=True):
                ids = [requests[trials[t][0]][1][i].item_id for i in positions]
                scored_before = set(parsed[t].scores)
                parsed[t] = merge_retry(parsed[t], parse_scores(reply, ids, id_key))
                for place, item_id in enumerate(map(str, ids)):
                    if item_id in parsed[t].scores and item_id not in scored_before:
                        retry_places[(t, item_id)] = place
        # per request, item id → (score, place shown, explanation) of each trial that scored it
        per_request: list[dict[str, list[tuple[float, int, str]]]] = [{} for _ in requests]
        for t, reply in enumerate(replies):
            if isinstance(reply, FailedReply) and not parsed[t].scores:
                problems[trials[t][0]].append(f"trial {t}: no answer from the VLM ({reply.reason})")
        for t, ((r, subset), result) in enumerate(zip(trials, parsed, strict=True)):
            shown = {str(requests[r][1][i].item_id): place for place, i in enumerate(subset)}
            for item_id, score in result.scores.items():
                place = retry_places.get((t, item_id), shown[item_id])
                per_request[r].setdefault(item_id, []).append((score, place, result.explanations.get(item_id, "")))
            problems[r] += result.problems
        out = []
        for r, (_, candidates) in enumerate(requests):
            scored = []
            for position, item in enumerate(candidates):
                scorings = per_request[r].get(str(item.item_id), [])
                values = [score for score, _, _ in scorings]
                places = [place for _, place, _ in scorings]
                explained = [explanation for _, _, explanation in scorings]
                mean = float(np.mean(values)) if values else float("nan")
                std = float(np.std(values)) if values else float("nan")
                scored.append(
                    (position, CandidateScore(item.item_id, mean, std, len(values), explained, values, places))
                )
            scored.sort(key=lambda ps: (np.isnan(ps[1].mean), -np.nan_to_num(ps[1].mean), ps[0]))
            out.append(RankingResult([s for _, s in scored], problems[r]))
        return out
