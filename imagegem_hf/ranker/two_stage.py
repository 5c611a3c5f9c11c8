"""Two-stage recommendation: CF retrieval → top-M → VLM re-ranking, evaluated as in ImageGem Table 7.

Only users whose held-out item is among the CF top-M can be re-ranked, so both rankings are compared on those
users: average rank and its std, Recall@5 and NDCG@5 (leave-one-out: one relevant item per user). The
stability report re-runs the randomized scoring with another seed and reports how much scores vary across
trials and how much the two runs agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau
from tqdm.auto import tqdm

from imagegem_hf.ranker.pipeline_vlm_ranker import RankItem, VLMRankerPipeline


def rank_metrics(ranks: list[int], k: int = 5) -> dict[str, float]:
    """Avg rank, rank std, Rec@k and NDCG@k of 1-based target ranks.

    Example:
        ```python
        >>> rank_metrics([1, 3, 7])["rec@5"]
        0.6666666666666666
        ```
    """
    r = np.asarray(ranks, dtype=float)
    if len(r) == 0:
        raise ValueError("No users to evaluate: no user has their test item among the CF candidates.")
    return {
        "avg_rank": float(r.mean()),
        "rank_std": float(r.std()),
        f"rec@{k}": float((r <= k).mean()),
        f"ndcg@{k}": float(np.where(r <= k, 1 / np.log2(r + 1), 0).mean()),
    }


@dataclass
class TwoStageReport:
    """CF and VLM ranks of the evaluated users, their metrics, and the stability report."""

    cf_name: str
    cf_ranks: dict[str, int]
    vlm_ranks: dict[str, int]
    stability: dict[str, float] = field(default_factory=dict)
    rankings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def table(self, k: int = 5) -> str:
        """Table 7's format: Avg Rank, Rank Std, Rec@k, NDCG@k for the CF model and the VLM re-ranker."""
        lines = [f"| model | Avg Rank | Rank Std | Rec@{k} | NDCG@{k} |", "|---|---:|---:|---:|---:|"]
        for name, ranks in ((self.cf_name, self.cf_ranks), ("VLM", self.vlm_ranks)):
            m = rank_metrics(list(ranks.values()), k)
            lines.append(
                f"| {name} | {m['avg_rank']:.2f} | {m['rank_std']:.2f} | {m[f'rec@{k}']:.4f} | {m[f'ndcg@{k}']:.4f} |"
            )
        lines.append(f"\n{len(self.vlm_ranks)} users whose test item is in the CF top-M.")
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, title: str) -> dict[str, Path]:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"table": out / f"{title}.md", "json": out / f"{title}.json"}
        stability = "\n".join(f"- {k}: {v:.4f}" for k, v in self.stability.items())
        paths["table"].write_text(f"## {title}\n\n{self.table()}\n\n### Stability\n\n{stability}\n")
        paths["json"].write_text(
            json.dumps(
                {
                    "cf_name": self.cf_name,
                    "cf_ranks": self.cf_ranks,
                    "vlm_ranks": self.vlm_ranks,
                    "stability": self.stability,
                    "rankings": self.rankings,
                },
                indent=2,
                default=str,
            )
        )
        return paths


def rerank_and_evaluate(
    payload: Mapping[str, Any],
    pipeline: VLMRankerPipeline,
    item_loader: Callable[[Any], RankItem],
    history_size: int = 5,
    top_m: int = 10,
    seed: int = 0,
    stability_seed: int | None = 1,
    max_users: int | None = None,
    show_progress: bool = True,
) -> TwoStageReport:
    """Re-rank CF candidates with the VLM and compare both rankings on the users it can help.

    Args:
        payload: `{"model_name", "rankings": {user: [top items]}, "histories": {user: [items, oldest first]},
            "targets": {user: test item}}` in original ids (as written by the recsys demo stage).
        pipeline: The VLM ranker (its `config.item_type` decides the templates).
        item_loader: Item id → `RankItem` (image and/or prompt).
        history_size: Latest history items captioned into the profile (H).
        top_m: CF candidates re-ranked (M).
        seed: Seed of the randomized scoring.
        stability_seed: Seed of a second scoring run for the stability report (`None` skips it).
        max_users: Evaluate at most this many eligible users (in payload order).
        show_progress: Progress bar over users.

    Returns:
        A `TwoStageReport`.
    """
    users = [u for u, ranked in payload["rankings"].items() if payload["targets"][u] in list(ranked)[:top_m]]
    users = users[:max_users] if max_users is not None else users
    if not users:
        raise ValueError("No user has their test item among the CF top-M candidates; nothing to re-rank.")
    histories, candidate_items, cf_ranks = [], [], {}
    for user in tqdm(users, desc="Loading items", disable=not show_progress):
        candidates = list(payload["rankings"][user])[:top_m]
        cf_ranks[user] = candidates.index(payload["targets"][user]) + 1
        histories.append((user, [item_loader(i) for i in list(payload["histories"][user])[-history_size:]]))
        candidate_items.append([item_loader(i) for i in candidates])
    profiles = pipeline.caption_batch(histories, show_progress=show_progress)  # one batch / concurrent requests
    requests = list(zip(profiles, candidate_items, strict=True))
    results = pipeline.rank_batch(requests, seed=seed, show_progress=show_progress)
    vlm_ranks = {
        u: [str(i) for i in r.ranking].index(str(payload["targets"][u])) + 1
        for u, r in zip(users, results, strict=True)
    }
    rankings = {
        u: [
            {
                "item_id": s.item_id,
                "score": s.mean,
                "std": s.std,
                "trials": s.n_trials,
                "explanation": s.explanations[0] if s.explanations else "",
            }
            for s in r.scores
        ]
        for u, r in zip(users, results, strict=True)
    }
    stds = [s.std for r in results for s in r.scores if s.n_trials > 1]
    stability = {
        "mean_score_std_across_trials": float(np.mean(stds)) if stds else float("nan"),
        "unscored_fraction": float(np.mean([s.n_trials == 0 for r in results for s in r.scores])),
    }
    if stability_seed is not None:
        again = pipeline.rank_batch(requests, seed=stability_seed, show_progress=False)
        taus, top1 = [], []
        for first, second in zip(results, again, strict=True):
            order = {str(i): p for p, i in enumerate(second.ranking)}
            tau = kendalltau(range(len(first.ranking)), [order[str(i)] for i in first.ranking]).statistic
            taus.append(0.0 if np.isnan(tau) else tau)
            top1.append(str(first.ranking[0]) == str(second.ranking[0]))
        stability |= {"kendall_tau_between_seeds": float(np.mean(taus)), "top1_agreement": float(np.mean(top1))}
    return TwoStageReport(payload.get("model_name", "CF"), cf_ranks, vlm_ranks, stability, rankings)
