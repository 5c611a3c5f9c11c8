"""One training schedule for the neural recommenders (Item2Vec, TwoTower, SASRec), counted in optimizer steps.

A fixed number of epochs does not transfer across data sizes: SASRec trains one sequence per user, so an epoch of
MovieLens-100K (943 users, batch 128) is 8 steps and an epoch of a million users is 7,800. The schedule is
therefore set in steps and scaled to the data:

- **budget**: `max_steps` defaults to `clip(budget_epochs × steps_per_epoch, min_steps, step_cap)`: many epochs
  of a small dataset, a fraction of an epoch of a large one, never fewer than `min_steps`;
- **warmup**: the learning rate rises linearly over the first `warmup_steps` (then stays constant), which keeps
  the first Adam steps on untrained embeddings from overshooting;
- **early stopping** (when validation data is given): validation NDCG@10 every `eval_every` steps
  (`clip(steps_per_epoch, 25, 1000)` by default, on at most `eval_users` users), stopping after `patience`
  evaluations without improvement, but never before `min_steps`; the best weights are restored.

Without validation data the model trains for the whole budget.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from imagegem_hf.recsys.data import InteractionData


@dataclass(frozen=True)
class StepSchedule:
    """Resolved step counts of one `fit` (see the module docstring for how the defaults are derived).

    Attributes:
        steps_per_epoch: Optimizer steps in one pass over the training examples.
        max_steps: Step budget.
        eval_every: Steps between two validation evaluations.
        patience: Evaluations without improvement before stopping.
        min_steps: Steps before early stopping may stop training.
        warmup_steps: Steps of linear learning-rate warmup.
    """

    steps_per_epoch: int
    max_steps: int
    eval_every: int
    patience: int
    min_steps: int
    warmup_steps: int

    @classmethod
    def resolve(
        cls,
        n_examples: int,
        batch_size: int,
        max_steps: int | None = None,
        budget_epochs: float = 100.0,
        step_cap: int = 200_000,
        eval_every: int | None = None,
        patience: int = 5,
        min_steps: int = 500,
        warmup_steps: int = 100,
    ) -> StepSchedule:
        """Fill in the data-dependent defaults.

        Args:
            n_examples: Training examples (sequences, pairs, …) in one epoch.
            batch_size: Examples per step.
            max_steps: Step budget; `None` scales it to the data.
            budget_epochs: Epochs in the scaled budget (before clipping to `[min_steps, step_cap]`).
            step_cap: Largest scaled budget.
            eval_every: Steps between evaluations; `None` is one epoch, clipped to [25, 1000].
            patience: Evaluations without improvement before stopping.
            min_steps: No early stop before this many steps.
            warmup_steps: Linear warmup steps (capped at a tenth of the budget).

        Returns:
            The resolved schedule.

        Example:
            ```python
            >>> StepSchedule.resolve(n_examples=943, batch_size=128).max_steps  # MovieLens-100K users
            800
            >>> StepSchedule.resolve(n_examples=1_000_000, batch_size=128).eval_every
            1000
            ```
        """
        steps_per_epoch = max(1, math.ceil(n_examples / batch_size))
        if max_steps is None:
            max_steps = int(min(max(budget_epochs * steps_per_epoch, min_steps), step_cap))
        if eval_every is None:
            eval_every = int(np.clip(steps_per_epoch, 25, 1000))
        return cls(
            steps_per_epoch=steps_per_epoch,
            max_steps=max_steps,
            eval_every=max(1, min(eval_every, max_steps)),
            patience=patience,
            min_steps=min(min_steps, max_steps),
            warmup_steps=min(warmup_steps, max_steps // 10),
        )

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at `step` (0-based): linear warmup, then 1."""
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0


def endless_batches(n_examples: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index batches over `n_examples`, reshuffled every epoch, forever."""
    while True:
        order = rng.permutation(n_examples)
        for start in range(0, n_examples, batch_size):
            yield order[start : start + batch_size]


def run_schedule(
    schedule: StepSchedule,
    modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[np.ndarray], torch.Tensor],
    batches: Iterator[np.ndarray],
    validate: Callable[[], float] | None = None,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train `modules` on `loss_fn(batch)` under `schedule`, early-stopping on `validate()` (higher is better).

    Args:
        schedule: Step counts.
        modules: Every trained parameter (its state is what the best checkpoint keeps).
        optimizer: Optimizer over `modules`' parameters; its learning rate is warmed up in place.
        loss_fn: Loss of one batch of example indices.
        batches: Endless iterator of example-index batches.
        validate: Validation score (e.g. NDCG@10), called every `schedule.eval_every` steps; `None` trains the
            whole budget.
        desc: Progress bar label.

    Returns:
        One record per evaluation (or per `eval_every` steps without validation): step, mean training loss since
        the last record, process CPU seconds since the start, and `val_ndcg@10` when validating.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    start_cpu = time.process_time()
    history: list[dict[str, float]] = []
    best, best_state, stale, running, count = -math.inf, None, 0, 0.0, 0
    progress = tqdm(range(schedule.max_steps), desc=desc, leave=False)
    for step in progress:
        modules.train()
        loss = loss_fn(next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        running, count = running + loss.item(), count + 1
        if (step + 1) % schedule.eval_every and step + 1 < schedule.max_steps:
            continue
        record = {"step": step + 1, "loss": running / count, "cpu_seconds": time.process_time() - start_cpu}
        running, count = 0.0, 0
        if validate is not None:
            modules.eval()
            with torch.no_grad():
                score = validate()
            record["val_ndcg@10"] = score
            if score > best:
                best, best_state, stale = score, copy.deepcopy(modules.state_dict()), 0
            else:
                stale += 1
            progress.set_postfix(val_ndcg=f"{score:.4f}", best=f"{best:.4f}")
        history.append(record)
        if validate is not None and stale >= schedule.patience and step + 1 >= schedule.min_steps:
            break
    if best_state is not None:
        modules.load_state_dict(best_state)
    modules.eval()
    return history


def validation_sample(validation: InteractionData, max_users: int, seed: int) -> InteractionData:
    """At most `max_users` validation rows (a fixed random subset): bounds the cost of each evaluation."""
    if len(validation) <= max_users:
        return validation
    keep = np.sort(np.random.default_rng(seed).choice(len(validation), max_users, replace=False))
    return validation.subset(keep)


class ScheduledTraining:
    """Mixin of the recommenders trained by `run_schedule`: their schedule hyper-parameters and how they resolve.

    The class sets `batch_size` and the attributes named in `SCHEDULE_KEYS` (documented on each model).
    """

    SCHEDULE_KEYS: tuple[str, ...] = (
        "max_steps",
        "budget_epochs",
        "min_steps",
        "eval_every",
        "patience",
        "warmup_steps",
        "eval_users",
    )

    def resolve_schedule(self, n_examples: int) -> StepSchedule:
        """The schedule of a `fit` on `n_examples` training examples."""
        return StepSchedule.resolve(
            n_examples,
            self.batch_size,
            max_steps=self.max_steps,
            budget_epochs=self.budget_epochs,
            eval_every=self.eval_every,
            patience=self.patience,
            min_steps=self.min_steps,
            warmup_steps=self.warmup_steps,
        )
