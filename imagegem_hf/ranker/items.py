"""Item content for the VLM from an ImageGem dataset folder: each image's prompt, each model's most-liked prompt.

The published tables hold image URLs, not pixels. When the `images` config has an `image` column its pixels are
used; otherwise each item is shown as a deterministic placeholder image (a colour derived from its id) with its
prompt, which exercises the full path but carries only the prompt's signal.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from imagegem_hf.ranker.pipeline_vlm_ranker import RankItem


def placeholder_image(item_id, size: int = 64) -> Image.Image:
    """A deterministic image for an item without pixels: a colour and a bar from the hash of its id."""
    digest = hashlib.sha256(str(item_id).encode()).digest()
    image = Image.new("RGB", (size, size), tuple(digest[:3]))
    ImageDraw.Draw(image).rectangle([0, size // 3, size, 2 * size // 3], fill=tuple(digest[3:6]))
    return image


def imagegem_item_loader(dataset_dir: str | os.PathLike, item_type: str) -> Callable[[object], RankItem]:
    """Item id → `RankItem` for `item_type` "image" (imageId) or "model" (modelVersionId) of a built dataset.

    Example:
        ```python
        >>> loader = imagegem_item_loader("demo_output/dataset", "model")  # doctest: +SKIP
        >>> loader(100123).text  # doctest: +SKIP
        ```
    """
    if item_type not in ("image", "model"):
        raise ValueError(f"item_type must be 'image' or 'model', got {item_type!r}.")
    columns = ["imageId", "modelVersionId", "prompt", "likeCount"]
    images = pd.read_parquet(Path(dataset_dir) / "images", columns=columns)
    if item_type == "image":
        prompts = images.drop_duplicates("imageId").set_index("imageId")["prompt"]
    else:
        best = images.sort_values(["likeCount", "imageId"], ascending=[False, True], kind="stable")
        prompts = best.dropna(subset=["modelVersionId"]).drop_duplicates("modelVersionId")
        prompts = prompts.set_index("modelVersionId")["prompt"]

    def load(item_id) -> RankItem:
        text = prompts.get(int(item_id)) if str(item_id).lstrip("-").isdigit() else None
        return RankItem(item_id, image=placeholder_image(item_id), text=text if isinstance(text, str) else None)

    return load
