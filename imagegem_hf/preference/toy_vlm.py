"""A toy VLM that sees the synthetic users' images: a small LLaVA pre-trained on interleaved captions of them.

Reading a user's references needs two circuits: one that copies each reference image into the answer (`+`/`-`) that
follows it, and one that matches the target with those answers. A real backbone (Idefics2, SmolVLM, LLaVA) brings
the first from pre-training on interleaved image-text data. The toy VLM gets the same kind of pre-training on
conversations of several synthetic images, each asked "Describe this image." and answered with its caption
("red circle bright striped"); the captions name the attributes only — no preference, no `+`/`−`, no user is shown.

Measured (`benchmarks/learn_preference.py`): with full attention in every layer (`text_model_type="llama"`) the
preference loss stays at `3·ln 2` (50/50 everywhere) for the whole stage-1 budget, caption pre-training or not. The
default language model is a Qwen2 whose first layer attends to the last `local_window` tokens only (one chat turn,
Qwen2's sliding-window layers) and whose second layer attends to everything: the first layer can then only mix each
answer with its own image, which gives stage 1 the signal to learn the matching.

The model is a `LlavaForConditionalGeneration` (CLIP vision tower with one 16×16 patch per image, a 2-layer language
model of width 64) with a tokenizer in which the chat markers, the questions and the attribute words are single
tokens, so a reference turn is 5 tokens long: `<user> <image> Score for this image? <assistant> +`.

Example:
    ```python
    >>> from imagegem_hf.preference.toy_vlm import ToyVLMConfig, pretrain_toy_vlm, toy_vlm
    >>> model, processor = toy_vlm(ToyVLMConfig())
    >>> _ = pretrain_toy_vlm(model, processor, ToyVLMConfig(pretrain_steps=2), progress=False)
    ```
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from imagegem_hf.preference.synthetic_users import ATTRIBUTES, attribute_caption, draw_attributes, render_image

# chat markers; the assistant's answer follows `<assistant>` directly (the answer prefix is empty)
TOY_VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user>{% else %}<assistant>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CAPTION_QUESTION = "Describe this image."
NAMING_QUESTION = "Name this image."
# made-up names of the few-shot naming task (a conversation names the two values of one attribute with two of them)
NONCE_WORDS = ("dax", "wug", "zup", "fep", "blick", "toma", "kiki", "bouba")
PREFERENCE_QUESTION = "Score for this image?"  # the preference builder's turn text without prompts


@dataclass
class ToyVLMConfig:
    """Architecture and pre-training of the toy VLM."""

    image_size: int = field(default=16, metadata={"help": "Image side; one patch of this size per image."})
    vision_hidden_size: int = field(default=32, metadata={"help": "Width of the CLIP vision tower (2 layers)."})
    text_hidden_size: int = field(default=64, metadata={"help": "Width of the Llama language model."})
    text_layers: int = field(default=2, metadata={"help": "Layers of the language model."})
    text_model_type: str = field(
        default="qwen2",
        metadata={
            "help": "'qwen2': a local (sliding-window) first layer, then full attention; 'llama': full attention in "
            "every layer (measured: stays at 50/50 on the preference task within the benchmark's budget)."
        },
    )
    local_window: int = field(
        default=4, metadata={"help": "qwen2: the first layer attends to the last this many tokens (one turn) only."}
    )
    pretrain_steps: int = field(default=600, metadata={"help": "Interleaved-caption pre-training steps."})
    pretrain_batch_size: int = field(default=16, metadata={"help": "Conversations per pre-training step."})
    images_per_conversation: int = field(default=8, metadata={"help": "Captioned images per conversation."})
    pretrain_learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (one-cycle)."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights and of the pre-training images."})

    def fingerprint(self) -> str:
        """A short hash of the configuration (names the cached pre-trained model)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def toy_vlm_tokenizer():
    """The byte-level tokenizer of `imagegem_hf.testing` with the toy VLM's markers, questions and words as single
    tokens."""
    from imagegem_hf.testing import tiny_vlm_tokenizer

    tokenizer = tiny_vlm_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<user>", "<assistant>"]})
    words = [w for pair in ATTRIBUTES.values() for w in pair]
    tokenizer.add_tokens(
        [CAPTION_QUESTION, NAMING_QUESTION, PREFERENCE_QUESTION, *(f" {w}" for w in words), *words, *NONCE_WORDS]
    )
    tokenizer.chat_template = TOY_VLM_CHAT_TEMPLATE
    return tokenizer


def toy_vlm(config: ToyVLMConfig | None = None):
    """A randomly initialised toy `LlavaForConditionalGeneration` and its `LlavaProcessor`.

    Returns:
        `(model, processor)`.

    Example:
        ```python
        >>> model, processor = toy_vlm()
        >>> type(model).__name__
        'LlavaForConditionalGeneration'
        ```
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    config = config or ToyVLMConfig()
    tokenizer = toy_vlm_tokenizer()
    width = config.vision_hidden_size
    backbone_config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=config.image_size,
            patch_size=config.image_size,
        ),
        text_config=_text_config(config, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(backbone_config).eval()
    size = config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=TOY_VLM_CHAT_TEMPLATE,
    )
    return model, processor


def _text_config(config: ToyVLMConfig, tokenizer) -> dict:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if config.text_model_type == "qwen2":
        return dict(
            model_type="qwen2",
            intermediate_size=2 * config.text_hidden_size,
            num_key_value_heads=4,
            max_position_embeddings=512,
            use_sliding_window=True,
            sliding_window=config.local_window,
            layer_types=["sliding_attention"] + ["full_attention"] * (config.text_layers - 1),
            tie_word_embeddings=False,
            **common,
        )
    if config.text_model_type == "llama":
        return dict(
            model_type="llama",
            intermediate_size=2 * config.text_hidden_size,
            num_key_value_heads=4,
            max_position_embeddings=512,
            **common,
        )
    raise ValueError(f"text_model_type must be 'qwen2' or 'llama', got {config.text_model_type!r}.")


def conversation_batch(
    processor, task: str, n_conversations: int, n_images: int, rng: np.random.Generator, image_size: int = 16
):
    """Pre-training conversations of `n_images` synthetic images, tokenised with `labels` on the answers only.

    `task="caption"`: each image is asked `CAPTION_QUESTION` and answered with its attributes in words.
    `task="naming"`: few-shot naming — the conversation picks one attribute and two made-up names for its two
    values; each image is asked `NAMING_QUESTION` and answered with the name of its value, which can only be
    inferred from the earlier images of the same conversation. It is not trained on: its accuracy measures whether
    the pre-trained model learns in context (chance 0.5).
    """
    if task not in ("caption", "naming"):
        raise ValueError(f"task must be 'caption' or 'naming', got {task!r}.")
    texts, images = [], []
    for _ in range(n_conversations):
        attributes = draw_attributes(n_images, rng)
        attribute = int(rng.integers(len(ATTRIBUTES)))
        names = rng.choice(NONCE_WORDS, size=2, replace=False)
        messages = []
        for a in attributes:
            question = CAPTION_QUESTION if task == "caption" else NAMING_QUESTION
            answer = attribute_caption(a).replace(",", "") if task == "caption" else names[int(a[attribute] < 0)]
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": str(answer)}]})
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images.append([render_image(a, rng, image_size) for a in attributes])
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    tokenizer = processor.tokenizer
    words = [w for pair in ATTRIBUTES.values() for w in pair]
    answer_ids = tokenizer.convert_tokens_to_ids([*words, *(f" {w}" for w in words), *NONCE_WORDS])
    is_answer = torch.isin(batch["input_ids"], torch.tensor(answer_ids))
    batch["labels"] = batch["input_ids"].masked_fill(~is_answer, -100)
    return batch


def answer_accuracy(
    model, processor, config: ToyVLMConfig, task: str = "caption", n_conversations: int = 32, seed: int = 12345
) -> float:
    """Fraction of answer tokens the model predicts right (greedy, teacher-forced) on fresh images; for `naming`
    only the images after the first four of each conversation count (before, the names are not yet known)."""
    rng = np.random.default_rng(seed)
    batch = conversation_batch(
        processor, task, n_conversations, config.images_per_conversation, rng, config.image_size
    )
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    keep = target != -100
    if task == "naming":
        keep &= keep.cumsum(-1) > 4
    return float((predicted[keep] == target[keep]).float().mean())


def pretrain_toy_vlm(model, processor, config: ToyVLMConfig | None = None, progress: bool = True):
    """Pre-train every weight of the toy VLM on interleaved captions of fresh synthetic images (next-token loss
    on the caption words), AdamW with a one-cycle schedule.

    Returns:
        The model (in eval mode), trained in place.
    """
    config = config or ToyVLMConfig()
    rng = np.random.default_rng(config.seed + 1)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.pretrain_learning_rate, total_steps=max(config.pretrain_steps, 1), pct_start=0.1
    )
    model.train()
    bar = tqdm(range(config.pretrain_steps), desc="toy VLM caption pre-training", disable=not progress)
    for _ in bar:
        batch = conversation_batch(
            processor, "caption", config.pretrain_batch_size, config.images_per_conversation, rng, config.image_size
        )
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def pretrained_toy_vlm(config: ToyVLMConfig | None = None, cache_dir: str | os.PathLike | None = None):
    """The pre-trained toy VLM and its processor, from `cache_dir` when it holds one of this configuration, else
    built, pre-trained and saved there (safetensors).

    Args:
        config: Architecture and pre-training settings.
        cache_dir: Folder of cached models (default `$HF_HOME/imagegem_hf/toy_vlm`); None-able via
            `IMAGEGEM_TOY_VLM_CACHE=off` to always train in-process.

    Returns:
        `(model, processor, {"caption": caption-word accuracy on fresh images})`.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    config = config or ToyVLMConfig()
    use_cache = os.environ.get("IMAGEGEM_TOY_VLM_CACHE", "on") != "off"
    if cache_dir is None:
        from huggingface_hub.constants import HF_HOME

        cache_dir = Path(HF_HOME) / "imagegem_hf" / "toy_vlm"
    folder = Path(cache_dir) / config.fingerprint()
    if use_cache and (folder / "model.safetensors").is_file():
        model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        processor = LlavaProcessor.from_pretrained(folder)
    else:
        model, processor = toy_vlm(config)
        pretrain_toy_vlm(model, processor, config)
        if use_cache:
            from imagegem_hf.hub import atomic_directory

            with atomic_directory(folder, overwrite=True) as tmp:
                model.save_pretrained(tmp)
                processor.save_pretrained(tmp)
    return model, processor, {"caption": answer_accuracy(model, processor, config, "caption")}
