"""Safety filtering: prompt toxicity (the paper's Detoxify rule) and Civitai browsing levels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

# The paper drops a prompt when any unsafe-category probability exceeds this.
TOXICITY_THRESHOLD = 0.2


@runtime_checkable
class ToxicityScorer(Protocol):
    """Anything with `scores(texts) -> {category: probabilities}` (one float array of len(texts) per category)."""

    def scores(self, texts: Sequence[str]) -> dict[str, np.ndarray]: ...


class DetoxifyScorer:
    """Detoxify's multilingual classifier (`pip install imagegem_hf[safety]`); its weights download on first use.

    Example:
        ```python
        >>> from imagegem_hf.data.safety import DetoxifyScorer, unsafe_mask
        >>> unsafe_mask(DetoxifyScorer(), ["a cat on a sofa"])  # doctest: +SKIP
        array([False])
        ```
    """

    def __init__(self, model_type: str = "original", device: str = "cpu") -> None:
        try:
            from detoxify import Detoxify
        except ImportError as err:
            raise ImportError(
                "Toxicity filtering needs Detoxify: `pip install imagegem_hf[safety]`, or pass --toxicity none."
            ) from err
        self.model = Detoxify(model_type, device=device)

    def scores(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: np.asarray(values, dtype=np.float32) for name, values in self.model.predict(list(texts)).items()}


def unsafe_mask(scorer: ToxicityScorer, texts: Sequence[str | None], threshold: float = TOXICITY_THRESHOLD):
    """Boolean mask of texts to drop: any category probability above `threshold` (empty/None texts are safe).

    Example:
        ```python
        >>> import numpy as np
        >>> class Words:
        ...     def scores(self, texts):
        ...         return {"toxicity": np.array([0.9 if "gore" in t else 0.0 for t in texts])}
        >>> unsafe_mask(Words(), ["a dog", "gore", None]).tolist()
        [False, True, False]
        ```
    """
    present = [i for i, text in enumerate(texts) if text]
    mask = np.zeros(len(texts), dtype=bool)
    if present:
        per_category = scorer.scores([texts[i] for i in present])
        worst = np.max(np.stack([np.asarray(v, dtype=np.float32) for v in per_category.values()]), axis=0)
        mask[present] = worst > threshold
    return mask
