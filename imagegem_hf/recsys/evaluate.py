"""Leave-one-last evaluation of several recommenders on one split, with the paper's table and a bar plot."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from imagegem_hf.recsys.base import Recommender
from imagegem_hf.recsys.data import InteractionData
from imagegem_hf.recsys.item2vec import Item2Vec
from imagegem_hf.recsys.knn import ItemKNN, Pop, UserKNN
from imagegem_hf.recsys.metrics import metrics_from_ranks, target_ranks
from imagegem_hf.recsys.sasrec import SASRec
from imagegem_hf.recsys.two_tower import TwoTower


class RandomRecommender(Recommender):
    """Uniformly random scores (seeded): the floor every model must clear."""

    name = "random"
    config_keys = ("seed",)

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def fit(self, train: InteractionData, validation: InteractionData | None = None) -> RandomRecommender:
        self._remember(train)
        return self

    def score(self, users: np.ndarray, history: InteractionData | None = None) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(users[0]) if len(users) else 0])
        return rng.random((len(users), len(self.item_ids)))


@dataclass
class EvaluationResult:
    """Metrics per model and split, the fitted models and the split they were fitted on."""

    metrics: dict[str, dict[str, dict[str, float]]]
    models: dict[str, Recommender]
    splits: tuple[InteractionData, InteractionData, InteractionData]
    ks: tuple[int, ...]
    fit_seconds: dict[str, float] = field(default_factory=dict)
    fit_cpu_seconds: dict[str, float] = field(default_factory=dict)

    def table(self, split: str = "test") -> str:
        """Markdown table in the paper's format (Rec@k and NDCG@k per model)."""
        header = ["model"] + [f"{m}@{k}" for k in self.ks for m in ("Rec", "NDCG")]
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for name, per_split in self.metrics.items():
            values = [f"{per_split[split][f'{m}@{k}']:.4f}" for k in self.ks for m in ("recall", "ndcg")]
            lines.append(f"| {name} | " + " | ".join(values) + " |")
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, title: str) -> dict[str, Path]:
        """Write `<title>.md`, `<title>.json` and `<title>.png` (Rec@k and NDCG@k bars) to `output_dir`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"table": out / f"{title}.md", "json": out / f"{title}.json", "plot": out / f"{title}.png"}
        paths["table"].write_text(
            f"## {title} (test)\n\n{self.table('test')}\n\n## {title} (validation)\n\n{self.table('validation')}\n",
            encoding="utf-8",
        )
        paths["json"].write_text(
            json.dumps(
                {"metrics": self.metrics, "fit_seconds": self.fit_seconds, "fit_cpu_seconds": self.fit_cpu_seconds},
                indent=2,
            )
        )
        names = list(self.metrics)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, metric in zip(axes, ("recall", "ndcg"), strict=True):
            width = 0.8 / len(self.ks)
            for j, k in enumerate(self.ks):
                ax.bar(
                    np.arange(len(names)) + j * width,
                    [self.metrics[n]["test"][f"{metric}@{k}"] for n in names],
                    width,
                    label=f"@{k}",
                )
            ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30)
            ax.set(title=f"{title}: {metric} (test)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(paths["plot"], dpi=120)
        plt.close(fig)
        return paths


def default_models(seed: int = 0) -> dict[str, Recommender]:
    """The paper's baselines with settings that train in seconds to minutes on a CPU."""
    return {
        "random": RandomRecommender(seed),
        "pop": Pop(),
        "itemknn": ItemKNN(),
        "userknn": UserKNN(),
        "item2vec": Item2Vec(seed=seed),
        "twotower": TwoTower(seed=seed),
        "sasrec": SASRec(seed=seed),
    }


def rank_targets(
    model: Recommender,
    users: np.ndarray,
    targets: np.ndarray,
    history: InteractionData,
    exclude_seen: bool = True,
    batch_size: int = 256,
) -> np.ndarray:
    """Full-ranking target ranks, scoring users in batches; `history`'s items are masked when `exclude_seen`."""
    seen = history.csr() if exclude_seen else None
    ranks = []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        scores = model.score(batch, history=history)
        ranks.append(target_ranks(scores, targets[start : start + batch_size], None if seen is None else seen[batch]))
    return np.concatenate(ranks)


def evaluate_models(
    data: InteractionData,
    models: dict[str, Recommender],
    ks: tuple[int, ...] = (10, 50, 100),
    min_interactions: int = 3,
    exclude_seen: bool = True,
) -> EvaluationResult:
    """Leave-one-last split, fit every model on train, evaluate on validation and test with full ranking.

    Validation ranks the second-to-last item given the train history; test ranks the last item given train +
    validation. Every model gets `fit(train, validation=val)` (the iterative ones early-stop on it) and the same
    seen-item mask.

    Example:
        ```python
        >>> from imagegem_hf.recsys import InteractionData
        >>> from imagegem_hf.recsys.evaluate import default_models, evaluate_models
        >>> data = InteractionData.from_table("demo_output/dataset", item_type="model")  # doctest: +SKIP
        >>> print(evaluate_models(data, default_models()).table())  # doctest: +SKIP
        ```
    """
    data = data.filter_users(min_interactions)
    if max(ks) > data.n_items:
        raise ValueError(f"k={max(ks)} is larger than the catalogue ({data.n_items} items); pass smaller --k.")
    train, val, test = data.leave_one_last()
    history_test = data.subset(np.isin(np.arange(len(data)), _positions(data, train, val)))
    results, fit_seconds, fit_cpu_seconds = {}, {}, {}
    for name, model in tqdm(models.items(), desc="models"):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.fit(train, validation=val)
        fit_seconds[name] = time.perf_counter() - start
        fit_cpu_seconds[name] = time.process_time() - start_cpu
        results[name] = {
            "validation": metrics_from_ranks(
                rank_targets(model, val.user_index, val.item_index, train, exclude_seen), ks
            ),
            "test": metrics_from_ranks(
                rank_targets(model, test.user_index, test.item_index, history_test, exclude_seen), ks
            ),
        }
    return EvaluationResult(results, models, (train, val, test), ks, fit_seconds, fit_cpu_seconds)


def _positions(data: InteractionData, *parts: InteractionData) -> np.ndarray:
    """Row positions in `data` of the interactions in `parts` (which are subsets of `data`)."""
    key = data.user_index * (data.n_items + 1) + data.item_index
    wanted = np.concatenate([p.user_index * (data.n_items + 1) + p.item_index for p in parts])
    return np.flatnonzero(np.isin(key, wanted))


def candidates_payload(result: EvaluationResult, model_name: str, top_m: int = 10, history: int = 5) -> dict:
    """Top-`top_m` test candidates, latest `history` items and the test target per user, in original ids."""
    model = result.models[model_name]
    train, val, test = result.splits
    full = InteractionData(
        np.concatenate([train.user_index, val.user_index]),
        np.concatenate([train.item_index, val.item_index]),
        np.concatenate([train.timestamp, val.timestamp]),
        train.user_ids,
        train.item_ids,
    )
    order = np.lexsort((full.timestamp, full.user_index))
    full = full.subset(order)
    users = test.user_index
    scores = model.score(users, history=full)
    seen = full.csr()[users].tocoo()
    scores[seen.row, seen.col] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :top_m]
    sequences = full.sequences()
    ids = train.item_ids
    return {
        "model_name": model_name,
        "rankings": {str(train.user_ids[u]): [_py(ids[i]) for i in row] for u, row in zip(users, top, strict=True)},
        "histories": {str(train.user_ids[u]): [_py(ids[i]) for i in sequences[u][-history:]] for u in users},
        "targets": {str(train.user_ids[u]): _py(ids[i]) for u, i in zip(users, test.item_index, strict=True)},
    }


def _py(value):
    return value.item() if hasattr(value, "item") else value
