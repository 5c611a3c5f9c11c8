"""Tiny, offline, randomly initialised components for tests, the demo and benchmarks.

Everything here is built from configs in code (no download) and is seeded, so two calls with the same
seed return identical weights. The shapes follow REFERENCE.md §8 ("tiny offline components that work").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run the block with one torch thread, then restore the previous count.

    A float32 matmul's rounding depends on how BLAS splits its reductions, which depends on the thread count. A
    reference computed in the test process must therefore use the thread count of the worker processes it is
    compared with (one each) to match them bit for bit on a machine of any size.

    Example:

    ```py
    >>> import torch
    >>> from imagegem_hf.testing import single_torch_thread
    >>> with single_torch_thread():
    ...     torch.get_num_threads()
    1
    ```
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# A chat template in the Llava style: "USER: <image>text ASSISTANT: text" turns.
TINY_VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-to-unicode table used by byte-level BPE tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A `CLIPTokenizer` over a byte-level vocabulary with no merges (every byte is a token).

    Example:
        ```python
        >>> from imagegem_hf.testing import tiny_clip_tokenizer
        >>> tok = tiny_clip_tokenizer()
        >>> tok("a cat").input_ids[:2]  # doctest: +SKIP
        ```
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = model_max_length
    return tokenizer


def tiny_clip_text_config(vocab_size: int, projection_dim: int = 8) -> dict[str, Any]:
    """Config kwargs of a 2-layer, 8-wide CLIP text encoder over the byte-level tokenizer's vocabulary
    (whose last two ids are `<|startoftext|>` and `<|endoftext|>`)."""
    return dict(
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
    )


def tiny_clip_model(seed: int = 0, image_size: int = 32, projection_dim: int = 8):
    """A tiny `CLIPModel` with its processor (byte-level tokenizer, `image_size`² images).

    Returns:
        `(model, processor)`.

    Example:
        ```python
        >>> from imagegem_hf.testing import tiny_clip_model
        >>> model, processor = tiny_clip_model()
        >>> model.config.projection_dim
        8
        ```
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=tiny_clip_text_config(len(tokenizer), projection_dim=projection_dim),
        vision_config=tiny_vision_config(image_size, patch_size=8, projection_dim=projection_dim),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_sd_components(seed: int = 0, sdxl: bool = False) -> dict[str, Any]:
    """Components of a tiny Stable Diffusion (1.5-shaped, or SDXL-shaped with two text encoders).

    The UNet has a cross-attention down block and up block (so `to_q`/`to_k`/`to_v`/`to_out.0` modules
    exist and LoRAs target them as on the real model); the VAE downsamples by 2, so 32×32 images have
    16×16 latents.

    Returns:
        A dict with `unet`, `vae`, `scheduler`, `text_encoder`, `tokenizer` (and `text_encoder_2`,
        `tokenizer_2` for SDXL), ready for `StableDiffusionPipeline(**components, safety_checker=None,
        feature_extractor=None)` or `StableDiffusionXLPipeline(**components)`.

    Example:
        ```python
        >>> from diffusers import StableDiffusionPipeline
        >>> from imagegem_hf.testing import tiny_sd_components
        >>> pipe = StableDiffusionPipeline(**tiny_sd_components(), safety_checker=None, feature_extractor=None)
        ```
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet_kwargs: dict[str, Any] = dict(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    if sdxl:
        unet_kwargs.update(
            cross_attention_dim=16,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=8 + 6 * 4,
            transformer_layers_per_block=(1, 1),
        )
    unet = UNet2DConditionModel(**unet_kwargs)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(**tiny_clip_text_config(len(tokenizer)))
    components: dict[str, Any] = dict(unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer)
    if sdxl:
        components["text_encoder"] = CLIPTextModel(text_config)
        torch.manual_seed(seed + 3)
        components["text_encoder_2"] = CLIPTextModelWithProjection(text_config)
        components["tokenizer_2"] = tiny_clip_tokenizer()
    else:
        components["text_encoder"] = CLIPTextModel(text_config)
    return components


def tiny_sd_pipeline(seed: int = 0, sdxl: bool = False):
    """A tiny `StableDiffusionPipeline` (or `StableDiffusionXLPipeline`) on the CPU.

    Example:
        ```python
        >>> from imagegem_hf.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> image = pipe("a cat", num_inference_steps=2, height=32, width=32).images[0]  # doctest: +SKIP
        ```
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components = tiny_sd_components(seed=seed, sdxl=sdxl)
    if sdxl:
        pipe = StableDiffusionXLPipeline(**components)
    else:
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vlm_tokenizer():
    """A byte-level fast tokenizer with `<image>`, `<pad>`, `<s>`, `</s>` and single-character `+`/`-` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = TINY_VLM_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_vision_config(image_size: int, patch_size: int, **extra: Any) -> dict[str, Any]:
    """The vision config of a tiny tower (8 wide, 2 layers, 2 heads) for `image_size`² images."""
    return dict(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def tiny_text_config(
    model_type: str, tokenizer, hidden_size: int, max_position_embeddings: int = 4096, **extra: Any
) -> dict[str, Any]:
    """The text config of a tiny VLM language model (2 layers, 2 heads) over `tokenizer`'s vocabulary."""
    return dict(
        model_type=model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def tiny_vlm(seed: int = 0, image_size: int = 16, text_hidden_size: int = 16):
    """A tiny `LlavaForConditionalGeneration` (CLIP vision tower + Llama LM) and its `LlavaProcessor`.

    Images are `image_size`² with 8×8 patches, so each `<image>` expands to `(image_size / 8)²` tokens.

    Returns:
        `(model, processor)`; the processor has a chat template (`processor.apply_chat_template`).

    Example:
        ```python
        >>> from imagegem_hf.testing import tiny_vlm, random_images
        >>> model, processor = tiny_vlm()
        >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        >>> text = processor.apply_chat_template(messages, add_generation_prompt=True)
        >>> inputs = processor(images=random_images(1, size=16), text=text, return_tensors="pt")
        >>> out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        ```
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_vlm_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=tiny_vision_config(image_size, patch_size=8, model_type="clip_vision_model", projection_dim=8),
        text_config=tiny_text_config("llama", tokenizer, text_hidden_size, max_position_embeddings=2048),
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP tower's CLS token, dropped by the "default" strategy
        chat_template=TINY_VLM_CHAT_TEMPLATE,
    )
    return model, processor


def random_images(n: int, size: int | tuple[int, int] = 32, seed: int = 0) -> list[Image.Image]:
    """`n` seeded random RGB PIL images of `size` (an int for squares, or `(width, height)`).

    Example:
        ```python
        >>> from imagegem_hf.testing import random_images
        >>> [im.size for im in random_images(2, size=(8, 4))]
        [(8, 4), (8, 4)]
        ```
    """
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]
