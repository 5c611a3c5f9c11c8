"""Labels for learning directions: CLIP style labels and per-user preference labels (ImageGem §4.3, §5.3).

Style (anime → realistic): each model's example images are compared with text prompts; models that do not
show a person (person score < 0.2) are dropped, so are models high on both styles; realistic ≥ 0.26 → +1,
anime ≥ 0.24 → −1.

Per user: embed the user's images, cluster them with HDBSCAN, take the 9 images nearest the main cluster's
mean, describe them (with a VLM, or a description supplied by the caller), and label the models by how similar
their example images are to that description: the top fraction +1, the bottom fraction −1.

Measured attributes: `attribute_labels` splits models by a number measured on their samples (the toy world's
attribute measures), in place of a CLIP score.

Embedders are pluggable: anything with `embed_texts` / `embed_images` returning L2-normalised rows
(`imagegem_hf.embeddings.CLIPEmbedder` for CLIP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from imagegem_hf.embeddings import l2_normalize

ImagesOrEmbeddings = Sequence[Image.Image] | np.ndarray


@dataclass
class StyleLabelConfig:
    """Prompts and thresholds of the ani→real labelling (ImageGem §5.3; thresholds on raw CLIP cosine).

    Attributes:
        person_prompt / realistic_prompt / anime_prompt: Text prompts the example images are compared with.
        person_threshold: Models below it are dropped (no person in the examples).
        realistic_threshold: Realistic score at or above it → +1.
        anime_threshold: Anime score at or above it → −1. Models meeting both style thresholds are dropped.
    """

    person_prompt: str = field(default="a photo of a person", metadata={"help": "Prompt of the person filter."})
    realistic_prompt: str = field(default="a realistic photo", metadata={"help": "Prompt of the +1 style."})
    anime_prompt: str = field(default="an anime illustration", metadata={"help": "Prompt of the −1 style."})
    person_threshold: float = field(default=0.2, metadata={"help": "Keep models with person score ≥ this."})
    realistic_threshold: float = field(default=0.26, metadata={"help": "Realistic score ≥ this → +1."})
    anime_threshold: float = field(default=0.24, metadata={"help": "Anime score ≥ this → −1."})


@dataclass
class StyleLabels:
    """Result of `style_labels`: labels of the kept models, every model's scores, and why others were dropped."""

    labels: dict[Hashable, int]
    scores: dict[Hashable, dict[str, float]]
    dropped: dict[Hashable, str]


@dataclass
class PreferenceLabels:
    """Result of `preference_labels`.

    Attributes:
        labels: +1 for the most similar models, −1 for the least similar (the middle is left out).
        similarities: Every model's similarity to the description.
        description: The text the models were compared with.
        representative: Indices of the user's images nearest the main cluster's mean.
        cluster_size: Size of the main HDBSCAN cluster (all images when HDBSCAN found no cluster).
        clustered: Whether HDBSCAN found a cluster.
    """

    labels: dict[Hashable, int]
    similarities: dict[Hashable, float]
    description: str
    representative: list[int]
    cluster_size: int
    clustered: bool


def _embed_images(embedder, images: ImagesOrEmbeddings) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return l2_normalize(images)
    if len(images) == 0:
        raise ValueError("A model or user has no images; drop it or supply at least one image.")
    return embedder.embed_images(list(images))


def _mean_similarity(image_embeddings: np.ndarray, text_embedding: np.ndarray) -> float:
    """Mean cosine of a model's example images to a text (the model's CLIP score)."""
    return float(np.mean(image_embeddings @ text_embedding))


def style_labels(
    model_images: Mapping[Hashable, ImagesOrEmbeddings], embedder, config: StyleLabelConfig | None = None
) -> StyleLabels:
    """Anime (−1) vs realistic (+1) labels from CLIP similarities of each model's example images.

    Args:
        model_images: `{model id: example images}` (PIL images, or precomputed image embeddings `(n, dim)`).
        embedder: Text and image embedder (e.g. `CLIPEmbedder.from_pretrained("openai/clip-vit-large-patch14")`).
        config: Prompts and thresholds (defaults: the paper's).

    Returns:
        `StyleLabels` with the labels of the kept models, the person/realistic/anime scores of all, and the reason
        each dropped model was dropped.

    Example:
        ```python
        >>> from imagegem_hf.embeddings import CLIPEmbedder
        >>> from imagegem_hf.w2w.labels import style_labels
        >>> embedder = CLIPEmbedder.from_pretrained("openai/clip-vit-large-patch14")  # doctest: +SKIP
        >>> result = style_labels({"m1": images_1, "m2": images_2}, embedder)  # doctest: +SKIP
        >>> result.labels  # doctest: +SKIP
        {'m1': 1}
        ```
    """
    config = config or StyleLabelConfig()
    person, realistic, anime = embedder.embed_texts(
        [config.person_prompt, config.realistic_prompt, config.anime_prompt]
    )
    labels, scores, dropped = {}, {}, {}
    for model_id, images in model_images.items():
        emb = _embed_images(embedder, images)
        score = {
            "person": _mean_similarity(emb, person),
            "realistic": _mean_similarity(emb, realistic),
            "anime": _mean_similarity(emb, anime),
        }
        scores[model_id] = score
        is_realistic = score["realistic"] >= config.realistic_threshold
        is_anime = score["anime"] >= config.anime_threshold
        if score["person"] < config.person_threshold:
            dropped[model_id] = "person score below threshold"
        elif is_realistic and is_anime:
            dropped[model_id] = "high on both styles"
        elif is_realistic:
            labels[model_id] = 1
        elif is_anime:
            labels[model_id] = -1
        else:
            dropped[model_id] = "neither style above threshold"
    return StyleLabels(labels=labels, scores=scores, dropped=dropped)


def attribute_labels(scores: Mapping[Hashable, float], top_fraction: float = 0.5) -> dict[Hashable, int]:
    """Label models by a measured attribute of their samples: the highest `top_fraction` +1, the lowest −1.

    The measured counterpart of `style_labels`: where an attribute can be measured on a model's example images
    (e.g. the toy world's warmth or subject size, `imagegem_hf.toy.measure_attributes`), its mean per model
    replaces the CLIP score. With the default 0.5 every model is labelled (a median split); ties at the split are
    broken by model order.

    Args:
        scores: `{model id: mean measured attribute of its samples}`.
        top_fraction: Fraction of models labelled +1 and, separately, −1 (at most 0.5).

    Returns:
        `{model id: ±1}` for the labelled models.

    Example:
        ```python
        >>> from imagegem_hf.w2w.labels import attribute_labels
        >>> attribute_labels({"a": 0.9, "b": -0.2, "c": 0.4, "d": 0.1})
        {'a': 1, 'c': 1, 'd': -1, 'b': -1}
        ```
    """
    if not 0 < top_fraction <= 0.5:
        raise ValueError(f"top_fraction must be in (0, 0.5], got {top_fraction}.")
    if len(scores) < 2:
        raise ValueError("Need at least 2 models to label.")
    order = sorted(scores, key=lambda model: scores[model], reverse=True)
    k = max(1, math.floor(top_fraction * len(order)))
    return {model: 1 for model in order[:k]} | {model: -1 for model in order[-k:]}


def representative_images(
    embeddings: np.ndarray, n: int = 9, min_cluster_size: int = 5
) -> tuple[list[int], int, bool]:
    """Indices of the `n` images nearest the mean of the largest HDBSCAN cluster of `embeddings`.

    Returns:
        `(indices, cluster_size, clustered)`. When HDBSCAN labels every image as noise (too few or too scattered
        images), all images form the cluster and `clustered` is False.
    """
    from sklearn.cluster import HDBSCAN

    embeddings = l2_normalize(embeddings)
    clustered = len(embeddings) >= max(2, min_cluster_size)
    members = np.arange(len(embeddings))
    if clustered:
        assignment = HDBSCAN(min_cluster_size=min(min_cluster_size, len(embeddings)), copy=True).fit_predict(
            embeddings
        )
        valid = assignment[assignment >= 0]
        clustered = valid.size > 0
        if clustered:
            main = np.bincount(valid).argmax()
            members = np.flatnonzero(assignment == main)
    center = embeddings[members].mean(axis=0)
    distances = np.linalg.norm(embeddings[members] - center, axis=1)
    nearest = members[np.argsort(distances, kind="stable")[:n]]
    return nearest.tolist(), int(len(members)), bool(clustered)


class VLMDescriber:
    """Describe what a set of images has in common with an image-text-to-text model (e.g. Qwen2-VL, LLaVA).

    Args:
        model: A transformers model with `generate` taking images (e.g. `LlavaForConditionalGeneration`).
        processor: Its processor, with a chat template.
        prompt: The instruction shown after the images.
        max_new_tokens: Generation budget.

    Example:
        ```python
        >>> from imagegem_hf.testing import random_images, tiny_vlm
        >>> from imagegem_hf.w2w.labels import VLMDescriber
        >>> describe = VLMDescriber(*tiny_vlm(), max_new_tokens=4)
        >>> isinstance(describe(random_images(2, size=16)), str)
        True
        ```
    """

    def __init__(
        self,
        model,
        processor,
        prompt: str = "Describe the visual style these images have in common (medium, colours, subject, mood).",
        max_new_tokens: int = 77,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> str:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": self.prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = self.processor(images=[im.convert("RGB") for im in images], text=text, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new_tokens, skip_special_tokens=True).strip()


def preference_labels(
    user_images: Sequence[Image.Image],
    model_images: Mapping[Hashable, ImagesOrEmbeddings],
    embedder,
    description: str | None = None,
    describer: Callable[[Sequence[Image.Image]], str] | None = None,
    top_fraction: float = 0.25,
    n_representative: int = 9,
    min_cluster_size: int = 5,
) -> PreferenceLabels:
    """Label models +1/−1 by how well their example images match a user's preferred style.

    Args:
        user_images: The user's generated images.
        model_images: `{model id: example images or their embeddings}`.
        embedder: Text and image embedder (CLIP).
        description: The user's preference as text. If `None`, `describer` writes it from the representative
            images.
        describer: Callable images → text (e.g. `VLMDescriber`).
        top_fraction: Fraction of models labelled +1 (most similar) and, separately, −1 (least similar).
        n_representative: Images nearest the main cluster's mean that are described (the paper uses 9).
        min_cluster_size: HDBSCAN's minimum cluster size.

    Returns:
        `PreferenceLabels`.

    Example:
        ```python
        >>> from imagegem_hf.embeddings import CLIPEmbedder
        >>> from imagegem_hf.testing import random_images, tiny_clip_model
        >>> from imagegem_hf.w2w.labels import preference_labels
        >>> embedder = CLIPEmbedder(*tiny_clip_model())
        >>> models = {f"m{i}": random_images(2, seed=i) for i in range(8)}
        >>> result = preference_labels(random_images(12), models, embedder, description="soft pastel portraits")
        >>> sorted(result.labels.values())
        [-1, -1, 1, 1]
        ```
    """
    if not 0 < top_fraction <= 0.5:
        raise ValueError(f"top_fraction must be in (0, 0.5], got {top_fraction}.")
    if description is None and describer is None:
        raise ValueError("Pass a `description` of the user's preference, or a `describer` (e.g. a VLMDescriber).")
    if len(model_images) < 2:
        raise ValueError("Need at least 2 models to label.")
    user_embeddings = embedder.embed_images(list(user_images))
    indices, cluster_size, clustered = representative_images(user_embeddings, n_representative, min_cluster_size)
    if description is None:
        description = describer([user_images[i] for i in indices])
    text = embedder.embed_texts([description])[0]
    similarities = {mid: _mean_similarity(_embed_images(embedder, ims), text) for mid, ims in model_images.items()}
    order = sorted(similarities, key=lambda mid: similarities[mid], reverse=True)
    k = max(1, math.floor(top_fraction * len(order)))
    labels = {mid: 1 for mid in order[:k]} | {mid: -1 for mid in order[-k:]}
    return PreferenceLabels(
        labels=labels,
        similarities=similarities,
        description=description,
        representative=indices,
        cluster_size=cluster_size,
        clustered=clustered,
    )
