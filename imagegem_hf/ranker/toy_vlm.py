"""A toy VLM trained to answer the appendix-B captioning and ranking prompts on synthetic images.

The images are those of `imagegem_hf.preference.synthetic_users` (four independent binary attributes: colour,
shape, background brightness, texture, drawn with random size, position, tint and noise). The toy VLM learns two
answers, supervised by programmatic ground truth:

- **captioning** (B.1.1): from a user's H history images, a structured profile with one line per field of the
  template, naming the majority value of the attribute that field stands for:

  ```
  1. Primary Subject Type: circle
  2. Defining Visual Features: red
  3. Artistic Style: striped
  4. Background Elements: dark
  ```

- **ranking** (B.1.2 + the multi-candidate suffix): for each candidate, in the order shown, a JSON object with its
  `image_id`, an `explanation` and a `similarity_score`, e.g.
  `{"image_id": 17, "explanation": "circle+ blue- striped+ dark+", "similarity_score": 75}`. The explanation names
  the candidate's value of each field, each followed by `+` when the profile has it too and `-` when not; the score
  is the attribute agreement with the profile, `FIELD_POINTS` (25) per shared field. The explanation comes first (a
  JSON object's keys have no order, and the pipeline parses any), so that each step of the answer is one small
  operation: a value read from the candidate's image, a mark comparing the value just written with the profile's,
  a score counting the `+` marks just written. With the score first and in proportion to each value's share of the
  history (one to three digit tokens out of 0–100), 3,000 steps gave scores uncorrelated with the target (Pearson
  −0.01 on fresh images); with a value-and-mark token per field (`"+circle"`, one step for the read and the
  comparison), 1,200 steps left those tokens at chance even with a single candidate.

Prompts are built by `VLMRankerPipeline` itself (through a recording backend), so training sees exactly the text
the pipeline sends. The model is a `LlavaForConditionalGeneration` (a CLIP vision tower with one 16×16 patch per
image, a 4-layer Llama language model of width 64, weights of std 1/√width) with a word-level tokenizer: the
templates, the chat markers, the JSON syntax, the attribute words and every integer up to `MAX_ITEM_ID` (ids and
scores) are single tokens, so that each answer object is 13 tokens and the next object's id is the one the prompt
shows after the id just written. Its vision side is first pre-trained on caption words against the language
model's own word embeddings (`pretrain_vision_on_words`: an image's embedding points to its words'), then frozen
while the whole answer is learnt, on one torch thread, at a learning rate that decays linearly to 0: after 600 +
3,000 steps (about 5 CPU minutes) every part of the answers but the profile words (97-98%) is 99.6-100% right
teacher-forced on fresh conversations of 5 candidates, and through the pipeline every fresh candidate gets a score,
with Pearson correlation 0.93 with the true agreement. (At 2,000 steps and a constant rate the ids are copied from
1,500 to 2,000 steps on, depending on the run, and two trainings on another machine than the first stopped at 82% on
the later ids and at 85% on the candidate's shape.) Answers grow worse towards the end of a long list: ranking
prompts show 1 to 10 candidates, so the k-th object of an answer is trained in (11 − k)/10 of the ranking batches.
It loads with `AutoModelForImageTextToText` and `AutoProcessor` from its folder and runs through
`VLMRankerPipeline` unchanged.

Example:
    ```python
    >>> from imagegem_hf.ranker.toy_vlm import ToyRankerVLMConfig, toy_ranker_vlm, train_toy_ranker_vlm
    >>> model, processor = toy_ranker_vlm(ToyRankerVLMConfig())
    >>> _ = train_toy_ranker_vlm(model, processor, ToyRankerVLMConfig(train_steps=2), progress=False)
    ```
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from imagegem_hf.preference.synthetic_users import ATTRIBUTES, draw_attributes, draw_tastes, render_image
from imagegem_hf.preference.toy_vlm import one_patch_llava
from imagegem_hf.ranker.pipeline_vlm_ranker import RankerConfig, RankItem, VLMRankerPipeline
from imagegem_hf.ranker.prompts import RankerTemplates
from imagegem_hf.testing import single_torch_thread

# chat markers; the assistant's answer follows `<assistant>` directly and ends with the tokenizer's `</s>`
TOY_RANKER_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user>{% else %}<assistant>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# captioning field of the template → the attribute it describes (profile lines in this order)
PROFILE_FIELDS: tuple[tuple[str, str], ...] = (
    ("1. Primary Subject Type:", "shape"),
    ("2. Defining Visual Features:", "colour"),
    ("3. Artistic Style:", "texture"),
    ("4. Background Elements:", "brightness"),
)
FIELD_POINTS = 25
"""Points a candidate earns per profile field it shares (the four fields weigh equally; 4 · 25 = 100)."""
MAX_ITEM_ID = 999
"""Largest id of a training candidate (ids are 0–999, one to three digit tokens)."""
NUMBER_EMBEDDING_SCALE = 3.0
"""Initial norm of the numbers' embeddings relative to the other tokens' (see `toy_ranker_vlm`)."""
SHARED, NOT_SHARED = "+", "-"
"""Marks of a candidate's value in the explanation: shared with the profile or not."""
_ATTRIBUTE_INDEX = {name: i for i, name in enumerate(ATTRIBUTES)}
_PROFILE_LINE = re.compile(r"^\s*(\d)\. [^:]+: (\w+)\s*$")

# Version of what a configuration does not name (the tokenizer, the training data and loop): a change to them
# must not load a model cached by the old code. 2: ids and scores are digit tokens. 3: the profile names the
# majority values only, the explanation marks each of the candidate's values and comes before the score, which
# counts the shared fields; the vision side is pre-trained first. 4: ids and scores are single tokens, the vision
# side is pre-trained against the word embeddings and then frozen, weights start at std 1/√width. 5: the numbers'
# embeddings start 3 times longer. 6: one torch thread, the learning rate decays linearly to 0.
TOY_RANKER_RECIPE = 6


@dataclass(frozen=True)
class ToyProfile:
    """The majority value (±1) of each attribute in a user's history.

    Attributes:
        values: Majority value per attribute, in `ATTRIBUTES` order.
    """

    values: tuple[int, ...]

    @classmethod
    def of(cls, history: np.ndarray) -> ToyProfile:
        """The profile of `(H, 4)` ±1 attributes; a tie (even H) goes to the latest image's value."""
        history = np.asarray(history)
        plus, n = (history > 0).sum(0), len(history)
        return cls(tuple(int(1 if 2 * p > n else -1 if 2 * p < n else history[-1, a]) for a, p in enumerate(plus)))

    def text(self) -> str:
        """The captioning answer (one line per template field)."""
        return "\n".join(
            f"{title} {_word(attribute, self.values[_ATTRIBUTE_INDEX[attribute]])}"
            for title, attribute in PROFILE_FIELDS
        )

    @classmethod
    def parse(cls, text: str) -> ToyProfile | None:
        """The profile written by `text()`, or `None` when `text` is not such a profile."""
        values = [0] * len(ATTRIBUTES)
        lines = text.strip().splitlines()
        if len(lines) != len(PROFILE_FIELDS):
            return None
        for line, (title, attribute) in zip(lines, PROFILE_FIELDS, strict=True):
            match = _PROFILE_LINE.match(line)
            pos, neg = ATTRIBUTES[attribute]
            if match is None or not line.strip().startswith(title) or match.group(2) not in (pos, neg):
                return None
            values[_ATTRIBUTE_INDEX[attribute]] = 1 if match.group(2) == pos else -1
        return cls(tuple(values))

    def shared(self, attributes: np.ndarray) -> np.ndarray:
        """Per attribute, whether the candidate has the profile's value."""
        return np.asarray(attributes) == np.asarray(self.values)

    def score(self, attributes: np.ndarray) -> int:
        """The candidate's similarity score: `FIELD_POINTS` per shared field (0, 25, 50, 75 or 100)."""
        return FIELD_POINTS * int(self.shared(attributes).sum())

    def explanation(self, attributes: np.ndarray) -> str:
        """`"circle+ blue- striped+ dark+"`: the candidate's value of each field (template order), each followed by
        `+` when the profile has it too, `-` when not."""
        shared = self.shared(attributes)
        return " ".join(
            _word(attribute, attributes[a]) + (SHARED if shared[a] else NOT_SHARED)
            for a, attribute in ((_ATTRIBUTE_INDEX[attribute], attribute) for _, attribute in PROFILE_FIELDS)
        )


def _word(attribute: str, value: int) -> str:
    pos, neg = ATTRIBUTES[attribute]
    return pos if value > 0 else neg


def ranking_answer(item_ids: list[int], profile: ToyProfile, attributes: list[np.ndarray]) -> str:
    """The ranking answer: a JSON list of `{"image_id", "explanation", "similarity_score"}` in the order shown (the
    explanation first: the score counts its `+` marks)."""
    return json.dumps(
        [
            {"image_id": int(i), "explanation": profile.explanation(a), "similarity_score": profile.score(a)}
            for i, a in zip(item_ids, attributes, strict=True)
        ]
    )


@dataclass
class ToyRankerVLMConfig:
    """Architecture and training of the toy ranker VLM."""

    image_size: int = field(default=16, metadata={"help": "Image side; one patch of this size per image."})
    vision_hidden_size: int = field(default=48, metadata={"help": "Width of the CLIP vision tower (2 layers)."})
    text_hidden_size: int = field(default=64, metadata={"help": "Width of the Llama language model."})
    text_layers: int = field(default=4, metadata={"help": "Layers of the language model."})
    text_heads: int = field(
        default=2, metadata={"help": "Attention heads of the language model (wide heads tell the 1,000 ids apart)."}
    )
    max_history_size: int = field(
        default=7, metadata={"help": "Training histories hold 1 to this many images (H; one image names its values)."}
    )
    max_candidates: int = field(
        default=10, metadata={"help": "Ranking prompts show 1 to this many candidates (single-pass scoring of M)."}
    )
    vision_pretrain_steps: int = field(
        default=600,
        metadata={
            "help": "Caption-word pre-training steps of the vision side (`pretrain_vision_on_words`, 128 images "
            "each) before the conversations (0: none)."
        },
    )
    freeze_vision: bool = field(
        default=True,
        metadata={
            "help": "Keep the vision tower, the projector and the attribute words' embeddings as pre-trained while "
            "training on the conversations (measured: trained along, the shape's word read from fresh images fell "
            "from 99% to 46% in 1,500 steps)."
        },
    )
    train_steps: int = field(
        default=3000,
        metadata={
            "help": "Training steps (captioning and ranking batches; measured: the ids are copied from 1,500-2,000 "
            "steps on, depending on the run; 2,000 steps at a constant rate left one of two fresh trainings at 82% "
            "on the later ids and another at 85% on the candidate's shape; see the module docstring)."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Conversations per step."})
    caption_fraction: float = field(
        default=0.25, metadata={"help": "Share of the steps that train captioning (the others: ranking)."}
    )
    learning_rate: float = field(
        default=1.5e-3, metadata={"help": "Peak AdamW learning rate (5% warmup, then a linear decay to 0)."}
    )
    taste_concentration: float = field(
        default=0.5, metadata={"help": "Dirichlet α of the tastes that draw the training histories."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights and of the training data."})

    def fingerprint(self) -> str:
        """A short hash of the configuration and of `TOY_RANKER_RECIPE` (names the cached trained model)."""
        recipe = {**asdict(self), "recipe": TOY_RANKER_RECIPE}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def explanation_words() -> dict[str, list[str]]:
    """Per attribute, the explanation tokens of its two values (`"circle"`, `" blue"`, ...; the first field's have no
    leading space); the `+`/`-` marks after them are byte tokens."""
    return {
        attribute: [("" if position == 0 else " ") + word for word in ATTRIBUTES[attribute]]
        for position, (_, attribute) in enumerate(PROFILE_FIELDS)
    }


def toy_ranker_tokenizer(templates: RankerTemplates | None = None):
    """The byte-level tokenizer of `imagegem_hf.testing` with the toy VLM's words as single tokens: the chat
    markers, the image templates and the pipeline's fixed phrases, the JSON syntax of the answers, the explanation
    words, the profile fields (the second to the fourth with the line break before them) and attribute words, and
    every integer from 0 to `MAX_ITEM_ID` (ids and scores). The `+`/`-` marks are byte tokens.

    Every answer object is then `{"image_id": `, the id, `, "explanation": "`, four values (one per field, each a
    word and a mark), `", "similarity_score": `, the score and `}, {"image_id": ` or `}]`: 13 tokens whatever the
    id; in the prompt a candidate is `image_id: `, the id, `. `, `<image>`: 4 tokens. An id is then one token in
    the prompt and in the answer, and the candidates of a prompt have distinct ones, so that the next object's id
    is the one shown after the last id written (with ids spelled in digits, the later objects' ids were copied
    at 17–50% per digit after 3,000 steps: digits repeat across the candidates of a prompt)."""
    from imagegem_hf.testing import tiny_vlm_tokenizer

    templates = templates or RankerTemplates()
    tokenizer = tiny_vlm_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<user>", "<assistant>"]})
    words = [w for pair in ATTRIBUTES.values() for w in pair]
    tokenizer.add_tokens(
        [
            templates.image_captioning,
            templates.image_ranking,
            templates.multi_candidate_suffix,
            "Visual preference profile of the user:\n",
            "image_id: ",
            ". ",
            "\n\n",
            '[{"image_id": ',
            ', "explanation": "',
            *(token for tokens in explanation_words().values() for token in tokens if not token.startswith(" ")),
            '", "similarity_score": ',
            '}, {"image_id": ',
            "}]",
            *(title if position == 0 else f"\n{title}" for position, (title, _) in enumerate(PROFILE_FIELDS)),
            "\n",
            *(f" {w}" for w in words),
            *(str(number) for number in range(MAX_ITEM_ID + 1)),
        ]
    )
    tokenizer.chat_template = TOY_RANKER_CHAT_TEMPLATE
    return tokenizer


def answer_token_budget(n_candidates: int) -> int:
    """The `max_new_tokens` that fits the toy VLM's answer for `n_candidates`: 13 tokens per object (its opening,
    the id, the explanation key, four words and marks, the score key, the score), then the closing and `</s>`."""
    return 13 * n_candidates + 2


def toy_ranker_vlm(config: ToyRankerVLMConfig | None = None):
    """A randomly initialised toy `LlavaForConditionalGeneration` and its `LlavaProcessor`.

    Returns:
        `(model, processor)`.

    Example:
        ```python
        >>> model, processor = toy_ranker_vlm()
        >>> type(model).__name__
        'LlavaForConditionalGeneration'
        ```
    """
    config = config or ToyRankerVLMConfig()
    tokenizer = toy_ranker_tokenizer()
    text_width = config.text_hidden_size
    text_config = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,  # an id or a score is copied from the prompt by attending to its embedding
        # weights and embeddings of std 1/√width (Llama's 0.02 is sized for widths in the thousands: at width 64 each
        # projection starts at a gain of 0.16, and after 2,000 steps a copied id's logit stood no higher than any
        # other number's)
        initializer_range=text_width**-0.5,
    )
    model, processor = one_patch_llava(
        tokenizer,
        text_config,
        vision_hidden_size=config.vision_hidden_size,
        image_size=config.image_size,
        chat_template=TOY_RANKER_CHAT_TEMPLATE,
        tie_word_embeddings=True,
        seed=config.seed,
    )
    # PyTorch's default initialisation for the projector, as in the preference toy VLM (at LLaVA's std of 0.02 the
    # vision pre-training does not teach the shape)
    for module in model.model.multi_modal_projector.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    # the numbers' (tied) embeddings start 3 times longer than the other tokens': an id's logit is at most the hidden
    # state's norm (√width after the final norm) times the id's embedding's, and at norm 1 the 999 other numbers, each
    # some 8 logits below the right id, drew 1 in 5 of the ids sampled at temperature 1 (ids not shown: candidates
    # left unscored)
    numbers = tokenizer.convert_tokens_to_ids([str(n) for n in range(MAX_ITEM_ID + 1)])
    with torch.no_grad():
        model.get_input_embeddings().weight[numbers] *= NUMBER_EMBEDDING_SCALE
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


class RecordingBackend:
    """A `VLMRankerPipeline` backend that records the requests it gets and answers each with `""` (how training
    builds its prompts with the pipeline's own code)."""

    def __init__(self) -> None:
        self.requests: list = []

    def generate(self, requests, sample_seed=None, show_progress=False, temperature=0.7) -> list[str]:
        self.requests += requests
        return [""] * len(requests)


def _draw_history(n: int, taste: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`(n, 4)` ±1 attributes drawn attribute by attribute with P(+1) = sigmoid(4·taste) (a user's history)."""
    p_plus = 1 / (1 + np.exp(-4 * taste))
    return np.where(rng.random((n, len(ATTRIBUTES))) < p_plus, 1, -1).astype(np.int8)


def training_conversations(
    config: ToyRankerVLMConfig, n: int, rng: np.random.Generator, n_candidates: int | None = None
) -> list[tuple[list[dict], list[Image.Image], str]]:
    """`n` training conversations `(content, images, answer)`, built by `VLMRankerPipeline`: captioning prompts of
    a fresh history of 1 to `max_history_size` images when `n_candidates` is `None`, else ranking prompts of
    `n_candidates` fresh candidates (random distinct ids) against the true profile of such a history."""
    size = config.image_size
    out = []
    for _ in range(n):
        taste = draw_tastes(1, config.taste_concentration, rng)[0]
        history = _draw_history(int(rng.integers(1, config.max_history_size + 1)), taste, rng)
        profile = ToyProfile.of(history)
        recorder = RecordingBackend()
        if n_candidates is None:
            pipeline = VLMRankerPipeline(backend=recorder)
            items = [RankItem(j, image=render_image(a, rng, size)) for j, a in enumerate(history)]
            pipeline.caption_batch([("user", items)])
            (content, images), answer = recorder.requests[0], profile.text()
        else:
            attributes = _draw_history(n_candidates, draw_tastes(1, config.taste_concentration, rng)[0], rng)
            ids = rng.choice(MAX_ITEM_ID + 1, size=n_candidates, replace=False)
            by_id = dict(zip(ids.tolist(), attributes, strict=True))
            candidates = [RankItem(int(i), image=render_image(a, rng, size)) for i, a in by_id.items()]
            pipeline = VLMRankerPipeline(
                backend=recorder, config=RankerConfig(k_subset=n_candidates, n_trials=1, max_retries=0)
            )
            pipeline.rank_batch([(profile.text(), candidates)], seed=int(rng.integers(2**31)))
            content, images = recorder.requests[0]
            shown = [int(part["text"].split(": ")[1].rstrip(". ")) for part in content[1:] if part["type"] == "text"]
            answer = ranking_answer(shown, profile, [by_id[i] for i in shown])
        out.append((content, images, answer))
    return out


def tokenize_conversations(processor, conversations) -> dict[str, torch.Tensor]:
    """Tokenise `(content, images, answer)` conversations as the pipeline's backend would, with `labels` on the
    answers (and their `</s>`) only."""
    tokenizer = processor.tokenizer
    texts = [
        processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        + answer
        + tokenizer.eos_token
        for content, _, answer in conversations
    ]
    images = [im for _, ims, _ in conversations for im in ims]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assistant = tokenizer.convert_tokens_to_ids("<assistant>")
    is_prompt = (batch["input_ids"] == assistant).flip(-1).cumsum(-1).flip(-1) > 0  # up to the <assistant> token
    labels = batch["input_ids"].masked_fill(is_prompt | (batch["attention_mask"] == 0), -100)
    batch["labels"] = labels
    return batch


def train_toy_ranker_vlm(
    model,
    processor,
    config: ToyRankerVLMConfig | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
):
    """Train the toy VLM: first its vision side on caption words (`pretrain_toy_vision` of the preference toy VLM,
    for `config.vision_pretrain_steps`), then every weight on fresh captioning and ranking conversations
    (next-token loss on the answers), AdamW with a linear warmup and a linear decay to 0, with one torch thread
    (the float rounding of a matmul depends on the thread count, and so, through 3,600 steps, does the model).

    Args:
        model: The toy VLM (`toy_ranker_vlm`).
        processor: Its processor.
        config: Training settings.
        progress: Show a progress bar.
        callback: Called after every step with `(step, loss)` (e.g. to evaluate along the way).

    Returns:
        The model (in eval mode), trained in place.
    """
    config = config or ToyRankerVLMConfig()
    with single_torch_thread():
        if config.vision_pretrain_steps > 0:
            pretrain_vision_on_words(model, processor, config, progress)
        _train_conversations(model, processor, config, progress, callback)
    return model.eval()


def _train_conversations(
    model, processor, config: ToyRankerVLMConfig, progress: bool, callback: Callable[[int, float], None] | None
) -> None:
    """The conversation stage of `train_toy_ranker_vlm` (the caller sets the thread count)."""
    from transformers import get_linear_schedule_with_warmup

    rng = np.random.default_rng(config.seed + 1)
    torch.manual_seed(config.seed)
    if config.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(False)
    words = model.get_input_embeddings().weight
    frozen_words = sorted({t for _, pos, neg in _attribute_word_pairs(processor.tokenizer) for t in (pos, neg)})
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, config.train_steps // 20), config.train_steps)
    model.train()
    bar = tqdm(range(config.train_steps), desc="toy ranker VLM training", disable=not progress)
    for step in bar:
        # one task and one candidate count per step, so that a batch holds prompts of one length
        caption = rng.random() < config.caption_fraction
        n_candidates = None if caption else int(rng.integers(1, config.max_candidates + 1))
        conversations = training_conversations(config, config.batch_size, rng, n_candidates)
        batch = tokenize_conversations(processor, conversations)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        if config.freeze_vision:
            words.grad[frozen_words] = 0.0
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if callback is not None:
            callback(step + 1, loss.item())


def _attribute_word_pairs(tokenizer) -> list[tuple[int, int, int]]:
    """`(attribute index, token of its +1 word, token of its −1 word)` for each spelling of each attribute's words:
    the profile's (`" circle"`) and, where it differs, the explanation's (`"circle"`, the first field's)."""
    pairs = []
    for attribute, (pos, neg) in ATTRIBUTES.items():
        spellings = {(f" {pos}", f" {neg}"), tuple(explanation_words()[attribute])}
        pairs += [(_ATTRIBUTE_INDEX[attribute], *tokenizer.convert_tokens_to_ids(list(s))) for s in sorted(spellings)]
    return pairs


def _fresh_images(n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Image.Image]]:
    """`n` random attribute draws `(n, 4)` and their images."""
    attributes = draw_attributes(n, rng)
    return attributes, [render_image(a, rng, size) for a in attributes]


def _image_embeddings(model, processor, images: list[Image.Image]) -> torch.Tensor:
    """`(n, text_hidden_size)`: each image's language-model input embedding (its one patch, projected)."""
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    features = model.get_image_features(
        pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output
    return torch.cat(list(features)).reshape(len(images), -1, model.config.text_config.hidden_size).mean(1)


def _word_logits(model, processor, images: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
    """Per image and attribute spelling, `x · (e₊ − e₋)`: how much the image's embedding `x` points to the +1 word's
    embedding rather than the −1 word's; and the attribute index of each spelling."""
    pairs = _attribute_word_pairs(processor.tokenizer)
    words = model.get_input_embeddings().weight
    directions = torch.stack([words[pos] - words[neg] for _, pos, neg in pairs])
    return _image_embeddings(model, processor, images) @ directions.T, [a for a, _, _ in pairs]


def pretrain_vision_on_words(model, processor, config: ToyRankerVLMConfig | None = None, progress: bool = True):
    """Caption-word pre-training of the vision side against the language model's own word embeddings: for every
    attribute, the logit that a fresh image's caption holds the +1 word rather than the −1 word is `x · (e₊ − e₋)`,
    with `x` the image's language-model input embedding and `e` the (tied) embeddings of the two words (binary
    cross-entropy; the vision tower, the projector and the attribute words' embeddings learn).

    The image embedding then points to its words' embeddings, which the language model both reads and writes: an
    attention head that copies an image's embedding forward already raises the logits of that image's words, and
    the mean embedding of a history's images points to its majority words. (With a separate linear head the
    attributes were linearly readable from the images, shape 98% and brightness 100%, but after the conversations
    the answers named the candidate's shape and brightness at 56% and 43%, teacher-forced.)

    Args:
        model: The toy VLM (`toy_ranker_vlm`).
        processor: Its processor.
        config: `vision_pretrain_steps`, `image_size` and `seed` are used (128 images per step, one-cycle AdamW at
            a peak learning rate of 3e-3).
        progress: Show a progress bar.

    Returns:
        The model (in eval mode), trained in place.
    """
    config = config or ToyRankerVLMConfig()
    rng = np.random.default_rng(config.seed + 2)
    torch.manual_seed(config.seed)
    parameters = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        model.get_input_embeddings().weight,  # only the attribute words get gradients
    ]
    steps = max(config.vision_pretrain_steps, 1)
    optimizer = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(config.vision_pretrain_steps), desc="toy ranker VLM vision pre-training", disable=not progress)
    for _ in bar:
        attributes, images = _fresh_images(128, rng, config.image_size)
        logits, index = _word_logits(model, processor, images)
        targets = torch.from_numpy(attributes[:, index] > 0).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    # the loss grows the embeddings' norm to sharpen its logits (to ~40 in 1,000 steps, against ~1 for the token
    # embeddings, so that an image's position in the language model held little but the image); scaling the
    # projector's output keeps every word logit's sign, and brings the images to the norm of the tokens
    with torch.no_grad():
        norm = _image_embeddings(model, processor, _fresh_images(512, rng, config.image_size)[1]).norm(dim=-1).mean()
        output = model.model.multi_modal_projector.linear_2
        output.weight /= norm
        output.bias /= norm
    return model.eval()


@torch.no_grad()
def vision_word_accuracy(
    model, processor, config: ToyRankerVLMConfig | None = None, n_images: int = 512, seed: int = 12345
) -> dict[str, float]:
    """Per attribute, the share of fresh images whose embedding points to the right word (`x · (e₊ − e₋)` of the
    right sign, both spellings counted): what the vision side hands the language model."""
    config = config or ToyRankerVLMConfig()
    rng = np.random.default_rng(seed)
    attributes, images = _fresh_images(n_images, rng, config.image_size)
    logits, index = _word_logits(model, processor, images)
    right = ((logits > 0).numpy() == (attributes[:, index] > 0)).mean(0)
    return {
        name: float(right[[j for j, a in enumerate(index) if a == i]].mean()) for name, i in _ATTRIBUTE_INDEX.items()
    }


def default_cache_dir() -> Path:
    """`$HF_HOME/imagegem_hf/toy_ranker_vlm`."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "imagegem_hf" / "toy_ranker_vlm"


def pretrained_toy_ranker_vlm(
    config: ToyRankerVLMConfig | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The folder of the trained toy ranker VLM of `config`, trained and saved (safetensors) on first use.

    Args:
        config: Architecture and training settings.
        cache_dir: Folder of cached models (default `default_cache_dir()`); one sub-folder per configuration hash.
        progress: Show a progress bar while training.

    Returns:
        A folder that `AutoModelForImageTextToText`, `AutoProcessor` and `VLMRankerPipeline.from_pretrained` load.
        It also holds `training.json` (the config and the CPU seconds training took).

    Example:
        ```python
        >>> from imagegem_hf.ranker import VLMRankerPipeline
        >>> folder = pretrained_toy_ranker_vlm()  # doctest: +SKIP
        >>> ranker = VLMRankerPipeline.from_pretrained(folder, max_new_tokens=128)  # doctest: +SKIP
        ```
    """
    config = config or ToyRankerVLMConfig()
    folder = Path(cache_dir or default_cache_dir()) / config.fingerprint()
    if (folder / "model.safetensors").is_file():
        return folder
    from imagegem_hf.hub import atomic_directory

    model, processor = toy_ranker_vlm(config)
    start = time.process_time()
    train_toy_ranker_vlm(model, processor, config, progress=progress)
    cpu_seconds = time.process_time() - start
    with atomic_directory(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps({"config": asdict(config), "cpu_seconds": cpu_seconds}))
    return folder


def evaluate_toy_ranker_vlm(
    model,
    processor,
    config: ToyRankerVLMConfig | None = None,
    n_users: int = 16,
    k: int = 5,
    history_size: int = 5,
    seed: int = 12345,
) -> dict[str, float]:
    """How well the toy VLM answers through `VLMRankerPipeline` (greedy) on fresh images.

    Each of `n_users` fresh users gets a history of `history_size` images and `k` candidates: the VLM captions the
    history, then scores the candidates in one trial against its own profile.

    Returns:
        `profile_exact` (share of profiles equal to the true one), `parse_rate` (share of candidates that got a
        score), `score_mae` (mean absolute error of the parsed scores against the true agreement with the true
        profile), `score_corr` (their Pearson correlation) and `score_exact` (the share of them equal to it).
    """
    config = config or ToyRankerVLMConfig()
    rng = np.random.default_rng(seed)
    size = config.image_size
    pipeline = VLMRankerPipeline(
        model, processor, RankerConfig(k_subset=k, n_trials=1, max_new_tokens=answer_token_budget(k), batch_size=16)
    )
    users, truths, requests = [], [], []
    for u in range(n_users):
        history = _draw_history(history_size, draw_tastes(1, config.taste_concentration, rng)[0], rng)
        users.append((f"user{u}", [RankItem(j, image=render_image(a, rng, size)) for j, a in enumerate(history)]))
        attributes = _draw_history(k, draw_tastes(1, config.taste_concentration, rng)[0], rng)
        truths.append((ToyProfile.of(history), attributes))
        requests.append([RankItem(j, image=render_image(a, rng, size)) for j, a in enumerate(attributes)])
    profiles = pipeline.caption_batch(users)
    results = pipeline.rank_batch(list(zip(profiles, requests, strict=True)), seed=seed)
    predicted, true = [], []
    for result, (profile, attributes) in zip(results, truths, strict=True):
        for s in result.scores:
            if s.n_trials:
                predicted.append(s.mean)
                true.append(profile.score(attributes[int(s.item_id)]))
    exact = [p == truth.text() for p, (truth, _) in zip(profiles, truths, strict=True)]
    predicted, true = np.array(predicted), np.array(true)
    return {
        "profile_exact": float(np.mean(exact)),
        "parse_rate": len(predicted) / (n_users * k),
        "score_mae": float(np.abs(predicted - true).mean()) if len(true) else float("nan"),
        "score_corr": float(np.corrcoef(predicted, true)[0, 1]) if len(true) > 1 else float("nan"),
        "score_exact": float((predicted == true).mean()) if len(true) else float("nan"),
    }


def answer_accuracy_by_field(
    model, processor, config: ToyRankerVLMConfig | None = None, n_conversations: int = 64, seed: int = 12345
) -> dict[str, float]:
    """Teacher-forced accuracy per part of the answers on fresh training-like conversations: the share of answer
    tokens the model predicts (greedy) given the true answer so far — which part of the task is learnt.

    Args:
        model: The toy VLM.
        processor: Its processor.
        config: The settings that draw the conversations (history sizes, tastes, image size).
        n_conversations: Captioning conversations, and ranking conversations of 5 candidates, each.
        seed: Seed of the conversations.

    Returns:
        `profile/<attribute>` (the profile word of each field), `id/first` and `id/later` (the id of the answer's
        first object and of the others), `explanation/<attribute>` (the candidate's value of each field),
        `mark/<attribute>` (its `+`/`-`), `score` and `syntax` (everything else).
    """
    config = config or ToyRankerVLMConfig()
    rng = np.random.default_rng(seed)
    tokenizer = processor.tokenizer
    kinds = {tokenizer.convert_tokens_to_ids(f" {w}"): f"profile/{a}" for a, pair in ATTRIBUTES.items() for w in pair}
    first_words = {tokenizer.convert_tokens_to_ids(w): a for a, words in explanation_words().items() for w in words}
    marks = set(tokenizer.convert_tokens_to_ids([SHARED, NOT_SHARED]))
    first_key, later_key = tokenizer.convert_tokens_to_ids(['[{"image_id": ', '}, {"image_id": '])
    score_key = tokenizer.convert_tokens_to_ids('", "similarity_score": ')
    explanation_key = tokenizer.convert_tokens_to_ids(', "explanation": "')
    hits: dict[str, list[bool]] = {}
    for n_candidates in (None, 5):
        batch = tokenize_conversations(processor, training_conversations(config, n_conversations, rng, n_candidates))
        labels = batch.pop("labels")
        with torch.no_grad():
            predicted = model(**batch).logits[:, :-1].argmax(-1)
        for row_predicted, row_target in zip(predicted.tolist(), labels[:, 1:].tolist(), strict=True):
            previous, field_ = None, 0
            for guess, target in zip(row_predicted, row_target, strict=True):
                if target == -100:
                    continue
                if previous in (first_key, later_key):
                    kind = "id/first" if previous == first_key else "id/later"
                elif previous == score_key:
                    kind = "score"
                elif target in marks:
                    kind = f"mark/{PROFILE_FIELDS[field_][1]}"
                    field_ += 1
                else:
                    field_ = 0 if target == explanation_key else field_
                    kind = kinds.get(target, "syntax")
                    if n_candidates is not None and target in first_words | kinds:
                        kind = f"explanation/{PROFILE_FIELDS[field_][1]}"
                hits.setdefault(kind, []).append(guess == target)
                previous = target
    return {kind: float(np.mean(values)) for kind, values in sorted(hits.items())}
