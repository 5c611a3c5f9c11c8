"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences, scored as
`cos(image, text)` without the logit scale (REFERENCE.md §5).

The released weights (`xswu/HPSv2`: `HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) are open_clip checkpoints;
they are read with `torch.load(weights_only=True)` (tensors only, nothing unpickled) and converted into a
transformers `CLIPModel`, so open_clip is not needed. Images are preprocessed like open_clip's evaluation transform
for HPSv2 (`ResizeMaxSize`): the longest side is resized to 224 (bicubic), the image is zero-padded to a centred
square, then normalised with the OpenAI CLIP mean and std; no center crop.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagegem_hf.hub import HubUnavailableError, atomic_directory
from imagegem_hf.scoring.base import CLIPPairScorer, tokenize
from imagegem_hf.scoring.open_clip_convert import open_clip_to_clip_model

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HPSV2_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPSV2_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def resize_max_size(image: Image.Image, size: int) -> Image.Image:
    """Resize the longest side of `image` to `size` (bicubic, aspect ratio kept) and zero-pad it to a centred
    `size`×`size` square, as open_clip's `ResizeMaxSize(size, fill=0)`.

    The new side lengths are `round(side * size / max(width, height))`; the padding is `pad // 2` on the left/top
    and the rest on the right/bottom. (open_clip skips the padding when the longest side already equals `size`,
    which leaves a non-square image the ViT cannot take; here such images are padded too.)

    Example:
        ```python
        >>> from PIL import Image
        >>> from imagegem_hf.scoring.hpsv2 import resize_max_size
        >>> resize_max_size(Image.new("RGB", (300, 150)), 224).size
        (224, 224)
        ```
    """
    image = image.convert("RGB")
    width, height = image.size
    scale = size / float(max(width, height))
    new_width, new_height = round(width * scale), round(height * scale)
    if scale != 1.0:
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    if new_width == new_height == size:
        return image
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image, ((size - new_width) // 2, (size - new_height) // 2))
    return canvas


def hpsv2_preprocess(images: list[Image.Image], image_size: int = 224) -> torch.Tensor:
    """HPSv2 pixel values: `resize_max_size`, scale to [0, 1], normalise with the OpenAI CLIP mean/std.

    Args:
        images: PIL images of any size and mode (converted to RGB).
        image_size: The vision tower's input size (224 for ViT-H-14).

    Returns:
        A float32 tensor of shape `(len(images), 3, image_size, image_size)`.

    Example:
        ```python
        >>> from imagegem_hf.scoring.hpsv2 import hpsv2_preprocess
        >>> from imagegem_hf.testing import random_images
        >>> hpsv2_preprocess(random_images(2, size=(300, 150))).shape
        torch.Size([2, 3, 224, 224])
        ```
    """
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)
    arrays = [
        (np.asarray(resize_max_size(image, image_size), dtype=np.float32) / np.float32(255.0) - mean) / std
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def _checkpoint_file(path_or_repo_id: str | os.PathLike, filename: str) -> Path:
    """The local path of `filename` from a checkpoint file, a directory, or a Hub repo (that one file only)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(
                f"{path} holds neither {filename} nor a converted CLIPModel (config.json); download {filename} "
                "from the xswu/HPSv2 Hub repo into it, or pass the repo id."
            )
        return path / filename
    text = str(path_or_repo_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{text!r} is not an existing file or directory (and not a Hub repo id 'org/name').")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=text, filename=filename))
    except LocalEntryNotFoundError as err:
        raise HubUnavailableError(
            f"Could not download {filename} from {text!r}: the Hugging Face Hub is unreachable and the file is not "
            "cached. Download it once with network access, or pass a local directory holding it."
        ) from err


class HPSv2(CLIPPairScorer):
    """Human Preference Score v2 / v2.1 of `(image, prompt)` pairs: `cos(image_embeds, text_embeds)`.

    Args:
        model: A `transformers.CLIPModel` with the HPSv2 weights (see `from_pretrained`); moved to `device` and
            `dtype`.
        tokenizer: A CLIP tokenizer (the ViT-H-14 one for the real model), or a `CLIPProcessor` whose tokenizer is
            used. Images are preprocessed by `hpsv2_preprocess` at the vision tower's `image_size`.
        device: Where the model runs.
        dtype: Model dtype; scores are returned as float32.

    Example:
        ```python
        >>> from imagegem_hf.scoring import HPSv2
        >>> from imagegem_hf.testing import random_images, tiny_clip_model
        >>> scorer = HPSv2(*tiny_clip_model())
        >>> scores = scorer.score(random_images(2, size=(48, 24)), ["a cat", "a dog"])
        >>> bool(scores.abs().max() <= 1)
        True
        ```
    """

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import ProcessorMixin

        super().__init__(model, device=device, dtype=dtype)
        self.tokenizer = tokenizer.tokenizer if isinstance(tokenizer, ProcessorMixin) else tokenizer

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = "xswu/HPSv2",
        version: str = "v2.1",
        clip_config=None,
        tokenizer_path_or_repo_id: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> HPSv2:
        """Load HPSv2 from the released open_clip checkpoint or from a converted transformers directory.

        Args:
            path_or_repo_id: One of: a Hub repo id holding the open_clip checkpoints (`"xswu/HPSv2"`; only the
                requested file is downloaded), a local directory holding them, a checkpoint file, or a directory
                written by `save_pretrained` / `CLIPModel.save_pretrained` (it has a `config.json`).
            version: `"v2.1"` (`HPS_v2.1_compressed.pt`) or `"v2.0"` (`HPS_v2_compressed.pt`); ignored for a
                converted directory.
            clip_config: The `CLIPConfig` (or dict) of the open_clip model; defaults to ViT-H-14
                (`open_clip_convert.vit_h_14_config()`). Ignored for a converted directory.
            tokenizer_path_or_repo_id: Where to load the tokenizer from. Defaults to the converted directory when it
                holds one, else `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (the tokenizer HPSv2 was trained with).
            device: Where the model runs.
            dtype: Model dtype.

        Raises:
            ValueError: Unsupported `version`, or weights that do not fit `clip_config`.
            FileNotFoundError: A local path without the checkpoint.
            HubUnavailableError: A repo id while offline with nothing cached.

        Example:
            ```python
            >>> from imagegem_hf.scoring import HPSv2
            >>> scorer = HPSv2.from_pretrained("xswu/HPSv2", version="v2.1", device="cuda")  # doctest: +SKIP
            >>> scorer.save_pretrained("hpsv2.1-transformers")  # doctest: +SKIP
            ```
        """
        from transformers import AutoTokenizer, CLIPModel

        if version not in HPSV2_CHECKPOINTS:
            raise ValueError(f"Unsupported HPSv2 version {version!r}; choose one of {sorted(HPSV2_CHECKPOINTS)}.")
        path = Path(path_or_repo_id).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            model = CLIPModel.from_pretrained(path, dtype=dtype)
            has_tokenizer = (path / "tokenizer_config.json").is_file()
            tokenizer_source = tokenizer_path_or_repo_id or (path if has_tokenizer else HPSV2_TOKENIZER)
        else:
            checkpoint_file = _checkpoint_file(path_or_repo_id, HPSV2_CHECKPOINTS[version])
            checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
            if not isinstance(checkpoint, dict):
                raise ValueError(f"{checkpoint_file} does not hold a state dict (got {type(checkpoint).__name__}).")
            model = open_clip_to_clip_model(checkpoint, clip_config)
            tokenizer_source = tokenizer_path_or_repo_id or HPSV2_TOKENIZER
        return cls(model, AutoTokenizer.from_pretrained(tokenizer_source), device=device, dtype=dtype)

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the converted `CLIPModel` (safetensors) and the tokenizer, loadable by `from_pretrained`.

        The directory is written to a temporary path and renamed into place.

        Example:
            ```python
            >>> from imagegem_hf.scoring import HPSv2
            >>> from imagegem_hf.testing import tiny_clip_model
            >>> HPSv2(*tiny_clip_model()).save_pretrained("tiny-hps", overwrite=True)  # doctest: +SKIP
            PosixPath('tiny-hps')
            ```
        """
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        return Path(save_directory)

    def _inputs(self, images: list[Image.Image], prompts: list[str]):
        return hpsv2_preprocess(images, self.image_size), tokenize(self.tokenizer, prompts, self.max_length)

    def _combine(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return (image_embeds * text_embeds).sum(-1)
