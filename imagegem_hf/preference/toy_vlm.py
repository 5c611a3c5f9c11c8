"""A toy VLM that sees the synthetic users' images: a small LLaVA pre-trained on interleaved captions of them.

Reading a user's references needs two circuits: one that copies each reference image into the answer (`+`/`-`) that
follows it, and one that matches the target with those answers. A real backbone (Idefics2, SmolVLM, LLaVA) brings
the first from pre-training on interleaved image-text data. The toy VLM gets the same kind of pre-training on
conversations of several synthetic images, each asked "Describe this image." and answered with its caption
("red circle bright striped"); the captions name the attributes only — no preference, no `+`/`−`, no user is shown.
Before that, its vision side (tower and projector) learns from single images which caption words they carry, as a
VLM's vision encoder is pre-trained on image–caption pairs first (`pretrain_toy_vision`). Measured
(`caption_accuracy_by_attribute` on fresh images, 600 caption steps): interleaved captions alone teach colour and
brightness (100%) but leave shape and texture at chance (50% and 67%), which caps any reader of the references at
the 76.6% that the reference rule reaches on colour and brightness alone; with 400 caption-word steps first (and a
projector initialised like a PyTorch `Linear`: at LLaVA's std of 0.02 shape stays at chance even then) every
attribute is named right on ≥ 98.8% of fresh images.

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
    >>> _ = pretrain_toy_vlm(model, processor, ToyVLMConfig(vision_pretrain_steps=2, pretrain_steps=2), progress=False)
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
# the version of the initialisation and pre-training code, part of the cache fingerprint (bump it when they change)
TOY_VLM_RECIPE = 2


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
    vision_pretrain_steps: int = field(
        default=400,
        metadata={
            "help": "Caption-word pre-training steps of the vision side before the interleaved captions (0: none; "
            "measured: without them the captions teach colour and brightness only, shape and texture stay at chance)."
        },
    )
    pretrain_steps: int = field(default=600, metadata={"help": "Interleaved-caption pre-training steps."})
    pretrain_batch_size: int = field(
        default=16,
        metadata={
            "help": "Conversations per pre-training step (the vision side sees as many images per step as these "
            "conversations hold)."
        },
    )
    images_per_conversation: int = field(default=8, metadata={"help": "Captioned images per conversation."})
    pretrain_learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (one-cycle)."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights and of the pre-training images."})

    def fingerprint(self) -> str:
        """A short hash of the configuration (names the cached pre-trained model)."""
        recipe = {**asdict(self), "recipe": TOY_VLM_RECIPE}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


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
    config = config or ToyVLMConfig()
    tokenizer = toy_vlm_tokenizer()
    model, processor = one_patch_llava(
        tokenizer,
        _text_config(config, tokenizer),
        vision_hidden_size=config.vision_hidden_size,
        image_size=config.image_size,
        chat_template=TOY_VLM_CHAT_TEMPLATE,
        tie_word_embeddings=False,
        seed=config.seed,
    )
    # PyTorch's default initialisation for the projector: at LLaVA's std of 0.02 it stays nearly linear, and
    # pre-training then never teaches the shape of the images (measured: shape caption words at chance)
    for module in model.model.multi_modal_projector.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return model, processor


def one_patch_llava(
    tokenizer,
    text_config: dict,
    vision_hidden_size: int,
    image_size: int,
    chat_template: str,
    tie_word_embeddings: bool,
    seed: int,
):
    """A randomly initialised `LlavaForConditionalGeneration` whose CLIP vision tower sees each image as one patch,
    and its `LlavaProcessor` (the toy VLMs of the preference model and of the ranker).

    Args:
        tokenizer: The tokenizer (with an `<image>` token).
        text_config: The language model's config (a `text_config` dict of `LlavaConfig`).
        vision_hidden_size: Width of the 2-layer vision tower.
        image_size: Side of the (square) images, which is also the patch size.
        chat_template: The processor's chat template.
        tie_word_embeddings: Tie the language model's input and output embeddings.
        seed: Seed of the initial weights.

    Returns:
        `(model, processor)`.
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    width = vision_hidden_size
    backbone_config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=image_size,
        ),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(backbone_config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=image_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=chat_template,
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
    predicted, target, keep = _teacher_forced_answers(model, processor, config, task, n_conversations, seed)
    if task == "naming":
        keep &= keep.cumsum(-1) > 4
    return float((predicted[keep] == target[keep]).float().mean())


def caption_accuracy_by_attribute(
    model, processor, config: ToyVLMConfig, n_conversations: int = 32, seed: int = 12345
) -> dict[str, float]:
    """Per attribute (`ATTRIBUTES`), the fraction of fresh images whose caption word for it the model predicts right
    (greedy, teacher-forced; chance 0.5): which attributes the pre-trained model can see."""
    predicted, target, keep = _teacher_forced_answers(model, processor, config, "caption", n_conversations, seed)
    word = (keep.cumsum(-1) - 1) % len(ATTRIBUTES)  # a caption names the attributes in `ATTRIBUTES` order
    return {
        name: float((predicted[keep & (word == k)] == target[keep & (word == k)]).float().mean())
        for k, name in enumerate(ATTRIBUTES)
    }


def _teacher_forced_answers(model, processor, config: ToyVLMConfig, task: str, n_conversations: int, seed: int):
    rng = np.random.default_rng(seed)
    batch = conversation_batch(
        processor, task, n_conversations, config.images_per_conversation, rng, config.image_size
    )
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    return predicted, target, target != -100


def _one_cycle(parameters, config: ToyVLMConfig, steps: int):
    optimizer = torch.optim.AdamW(parameters, lr=config.pretrain_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.pretrain_learning_rate, total_steps=max(steps, 1), pct_start=0.1
    )
    return optimizer, schedule


def pretrain_toy_vision(model, processor, config: ToyVLMConfig | None = None, progress: bool = True):
    """Caption-word pre-training of the vision side (vision tower and projector), as a VLM's vision encoder is
    pre-trained on image–caption pairs before the VLM sees interleaved text: a linear head on each fresh synthetic
    image's language-model input embedding predicts, for every attribute, which of its two words the image's caption
    holds (binary cross-entropy); the head is dropped afterwards.

    Returns:
        The model (in eval mode), its vision side trained in place.
    """
    config = config or ToyVLMConfig()
    rng = np.random.default_rng(config.seed + 2)
    torch.manual_seed(config.seed)
    vision = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    head = torch.nn.Linear(config.text_hidden_size, len(ATTRIBUTES))
    optimizer, schedule = _one_cycle([*vision, *head.parameters()], config, config.vision_pretrain_steps)
    n_images = config.pretrain_batch_size * config.images_per_conversation
    model.train()
    bar = tqdm(range(config.vision_pretrain_steps), desc="toy VLM vision pre-training", disable=not progress)
    for _ in bar:
        attributes = draw_attributes(n_images, rng)
        images = [render_image(a, rng, config.image_size) for a in attributes]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(
            pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
        logits = head(torch.cat(list(features)).reshape(n_images, -1, config.text_hidden_size).mean(1))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(attributes > 0).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def pretrain_toy_vlm(model, processor, config: ToyVLMConfig | None = None, progress: bool = True):
    """Pre-train the toy VLM: first its vision side on caption words (`pretrain_toy_vision`, for
    `config.vision_pretrain_steps`), then every weight on interleaved captions of fresh synthetic images (next-token
    loss on the caption words); AdamW with a one-cycle schedule in both.

    Returns:
        The model (in eval mode), trained in place.
    """
    config = config or ToyVLMConfig()
    if config.vision_pretrain_steps > 0:
        pretrain_toy_vision(model, processor, config, progress)
    rng = np.random.default_rng(config.seed + 1)
    torch.manual_seed(config.seed)
    optimizer, schedule = _one_cycle(model.parameters(), config, config.pretrain_steps)
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
        `(model, processor, accuracy)`, `accuracy` on fresh images: `"caption"` over all caption words, and per
        attribute name (`caption_accuracy_by_attribute`).
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
    accuracy = {"caption": answer_accuracy(model, processor, config, "caption")}
    return model, processor, accuracy | caption_accuracy_by_attribute(model, processor, config)
