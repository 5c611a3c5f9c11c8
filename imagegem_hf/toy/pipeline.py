"""The toy world's text-to-image model: the Stable Diffusion 1.5 architecture at toy scale, and its shipped weights.

`toy_components()` builds the untrained parts (a `UNet2DConditionModel` with cross-attention and, through
`addition_embed_type="text"`, the attention-pooled prompt added to its timestep embedding; an `AutoencoderKL`
that maps 32×32 images to 4×16×16 latents, a `CLIPTextModel`, a `CLIPTokenizer` over the grammar's words and SD 1.5's
DDIM schedule); `imagegem_hf.toy.train` trains them; `load_toy_pipeline()` loads the trained pipeline that ships in
`imagegem_hf/toy/assets/toy-sd` (Hub layout: it loads with plain `StableDiffusionPipeline.from_pretrained(path)`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from imagegem_hf.toy.world import IMAGE_SIZE, vocabulary

TOY_PIPELINE_PATH = Path(__file__).parent / "assets" / "toy-sd"
MAX_PROMPT_TOKENS = 16
TEXT_WIDTH = 32

# Architecture of the toy model (the SD 1.5 layout at toy scale; see toy_components).
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=IMAGE_SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=1,
    norm_num_groups=8,
    # The prompt also reaches every ResNet block through the timestep embedding (attention-pooled text states):
    # a global conditioning path that a UNet this small learns within the CPU budget, beside cross-attention.
    addition_embed_type="text",
    addition_embed_type_num_heads=2,
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
)
# SD 1.5's noise schedule, sampled with DDIM.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def toy_tokenizer():
    """A `CLIPTokenizer` whose BPE merges spell each word of the grammar as one token (prompts ≤ 16 tokens).

    Words outside the grammar fall apart into letters, which the toy text encoder never saw in training.

    Example:
        ```python
        >>> from imagegem_hf.toy.pipeline import toy_tokenizer
        >>> tok = toy_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
        ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']
        ```
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[str] = []
    for word in vocabulary():
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        Path(vocab_file).write_text(json.dumps(vocab))
        Path(merges_file).write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=MAX_PROMPT_TOKENS)


def toy_components(seed: int = 0) -> dict[str, Any]:
    """The untrained toy model, seeded: `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`.

    Example:
        ```python
        >>> from diffusers import StableDiffusionPipeline
        >>> from imagegem_hf.toy.pipeline import toy_components
        >>> pipe = StableDiffusionPipeline(**toy_components(), safety_checker=None, feature_extractor=None,
        ...                                requires_safety_checker=False)
        ```
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = toy_tokenizer()
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Unit-scale word embeddings (CLIP initialises them at std 0.02): the prompts' hidden states differ from the
    # first step, so the UNet's conditioning paths get a signal to learn from within the short training budget.
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )


def load_toy_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The trained toy `StableDiffusionPipeline` (shipped with the package, never downloaded).

    Args:
        path: A pipeline folder written by `python -m imagegem_hf.toy.train` (default: the shipped one).
        device: Where the pipeline runs.

    Returns:
        A `StableDiffusionPipeline` (no safety checker, progress bar off). Generate 32×32 images with
        `pipe(prompts, num_inference_steps=20, guidance_scale=TOY_GUIDANCE_SCALE)`; height and width default to 32.

    Example:
        ```python
        >>> from imagegem_hf.toy import load_toy_pipeline
        >>> pipe = load_toy_pipeline()
        >>> pipe.unet.config.sample_size, pipe.vae_scale_factor
        (16, 2)
        ```
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else TOY_PIPELINE_PATH
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No toy pipeline at {folder} (model_index.json missing); train one with "
            f"`python -m imagegem_hf.toy.train --output-dir {folder}`."
        )
    pipe = StableDiffusionPipeline.from_pretrained(str(folder)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
