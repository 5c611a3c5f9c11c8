"""Tiny random Idefics3 (SmolVLM) and Qwen2-VL backbones with their processors, built in code (no downloads).

They complement `imagegem_hf.testing.tiny_vlm` (LLaVA) so that `PreferencePrototypeModel` can be exercised on the
other backbone families the paper's model must support: Idefics2 (perceiver resampler), Idefics3 (pixel-shuffle
connector, `<fake_token_around_image>` wrapped image tokens, the SmolVLM chat template whose generation prompt is
`Assistant:` but whose answers render as `Assistant: +`) and Qwen2-VL (3-D multimodal rotary positions). They use the
byte-level tokenizer of `tiny_vlm` with the backbone's special tokens added; Idefics2 can also take
`tiny_metaspace_tokenizer()`, a SentencePiece-style (Metaspace) tokenizer like the Mistral one of the real Idefics2.
"""

from __future__ import annotations

import string

import torch

from imagegem_hf.testing import tiny_text_config, tiny_vision_config, tiny_vlm_tokenizer

# SmolVLM's published chat template (an answered assistant turn renders "Assistant: +", the generation prompt ends
# "Assistant:")
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Qwen2-VL's chat template (default system turn, images wrapped in vision start/end tokens)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# words that get their own (word-start `▁`-prefixed or bare) pieces in `tiny_metaspace_tokenizer`
METASPACE_WORDS = ("User", "Assistant", "The", "prompt", "is", "Score", "for", "this", "image", "+", "-")


def tiny_metaspace_tokenizer():
    """A SentencePiece-style fast tokenizer (Unigram model, Metaspace pre-tokenizer with `prepend_scheme="first"`,
    `<s>` prepended), the family of the Llama 2 / Mistral tokenizers and of Idefics2's.

    Spaces become `▁` and only the first piece of the text gets a `▁` in front, so `"User:"` tokenizes to `▁User :`
    on its own but to `User :` after an added token: a text cut in two does not always tokenize like the whole.
    Pieces: `<unk> <s> </s> <pad>`, every printable character, `▁`, and `▁word`/`word` for `METASPACE_WORDS`.

    Example:
        ```python
        >>> from imagegem_hf.preference.tiny_backbones import tiny_metaspace_tokenizer
        >>> tokenizer = tiny_metaspace_tokenizer()
        >>> tokenizer.convert_ids_to_tokens(tokenizer("User: +").input_ids)
        ['<s>', '▁User', ':', '▁+']
        ```
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    characters = sorted(set(string.printable) - set(" \x0b\x0c")) + ["▁"]
    words = [piece for word in METASPACE_WORDS for piece in (word, f"▁{word}") if piece not in characters]
    vocab = [(t, 0.0) for t in specials] + [(c, -10.0) for c in characters] + [(w, -5.0) for w in words]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_idefics3(seed: int = 0, image_size: int = 16, text_hidden_size: int = 16):
    """A tiny `Idefics3ForConditionalGeneration` (SmolVLM architecture) and its `Idefics3Processor`.

    Images are resized to `image_size`² without splitting; 4×4 patches and a pixel-shuffle factor of 2 give
    `(image_size / 8)²` `<image>` tokens per image, wrapped in `<fake_token_around_image><global-img>…`.

    Returns:
        `(model, processor)` with SmolVLM's chat template.

    Example:
        ```python
        >>> from imagegem_hf.preference.tiny_backbones import tiny_idefics3
        >>> model, processor = tiny_idefics3()
        >>> type(model).__name__
        'Idefics3ForConditionalGeneration'
        ```
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = tiny_vlm_tokenizer()
    specials = ["<|im_start|>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    specials += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *specials]})
    tokenizer.chat_template = SMOLVLM_CHAT_TEMPLATE
    patch_size, scale_factor = 4, 2
    config = Idefics3Config(
        vision_config=tiny_vision_config(image_size, patch_size),
        text_config=tiny_text_config("llama", tokenizer, text_hidden_size),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_idefics2(
    seed: int = 0,
    image_size: int = 16,
    text_hidden_size: int = 16,
    image_tokens: int = 4,
    tokenizer=None,
    chat_template: str | None = None,
):
    """A tiny `Idefics2ForConditionalGeneration` (the paper's backbone architecture) and its `Idefics2Processor`.

    Images are resized to `image_size`² without splitting; the perceiver resampler turns each into `image_tokens`
    `<image>` tokens wrapped in `<fake_token_around_image>`.

    Args:
        seed: Seed of the random weights.
        image_size: Side of the (square) images.
        text_hidden_size: Width of the language model.
        image_tokens: `<image>` tokens per image.
        tokenizer: The tokenizer (default: the byte-level one of `tiny_vlm`; `tiny_metaspace_tokenizer()` for the
            SentencePiece family); Idefics2's special tokens are added to it.
        chat_template: The chat template (default: Idefics2's).

    Returns:
        `(model, processor)`, by default with Idefics2's chat template (the SmolVLM one without `<|im_start|>`).

    Example:
        ```python
        >>> from imagegem_hf.preference.tiny_backbones import tiny_idefics2
        >>> model, processor = tiny_idefics2()
        >>> type(model).__name__
        'Idefics2ForConditionalGeneration'
        ```
    """
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessorPil,
        Idefics2Processor,
    )

    template = chat_template or SMOLVLM_CHAT_TEMPLATE.removeprefix("<|im_start|>")
    tokenizer = tokenizer if tokenizer is not None else tiny_vlm_tokenizer()
    specials = ["<fake_token_around_image>", "<end_of_utterance>"]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *specials]})
    tokenizer.chat_template = template
    config = Idefics2Config(
        vision_config=tiny_vision_config(image_size, patch_size=4),
        perceiver_config=dict(
            hidden_size=text_hidden_size,
            resampler_n_latents=image_tokens,
            resampler_depth=1,
            resampler_n_heads=2,
            resampler_head_dim=4,
            num_key_value_heads=1,
        ),
        text_config=tiny_text_config("mistral", tokenizer, text_hidden_size),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=False, size={"shortest_edge": image_size, "longest_edge": image_size}
    )
    processor = Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_tokens, chat_template=template
    )
    return model, processor


def tiny_qwen2_vl(seed: int = 0, image_size: int = 16, text_hidden_size: int = 16):
    """A tiny `Qwen2VLForConditionalGeneration` and its `Qwen2VLProcessor`.

    Images are resized to `image_size`² (a multiple of 8): 4×4 patches merged 2×2 give `(image_size / 8)²`
    `<|image_pad|>` tokens per image, with 3-D (temporal, height, width) rotary positions.

    Returns:
        `(model, processor)` with Qwen2-VL's chat template.

    Example:
        ```python
        >>> from imagegem_hf.preference.tiny_backbones import tiny_qwen2_vl
        >>> model, processor = tiny_qwen2_vl()
        >>> type(model).__name__
        'Qwen2VLForConditionalGeneration'
        ```
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = tiny_vlm_tokenizer()
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *specials]})
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    patch_size, merge_size = 4, 2
    head_dim = text_hidden_size // 2
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=8,
            hidden_size=text_hidden_size,
            num_heads=2,
            mlp_ratio=2,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=2,
            in_channels=3,
        ),
        text_config=tiny_text_config(
            "qwen2_vl_text",
            tokenizer,
            text_hidden_size,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, head_dim // 2 - 2],
            },
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    processor = _image_only_qwen2_vl_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    return model, processor


def _image_only_qwen2_vl_processor_class():
    """`Qwen2VLProcessor` without its video processor (whose module needs torchvision); images only."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor
