"""Build the interleaved reference/target sequence of a preference query with the backbone's own processor.

A query is a user's `N_ref` reference pairs (a liked and a disliked image with their generation prompt) and a
target image. Each image becomes one chat turn (paper 003, REFERENCE §7):

    user: <image>The prompt is '<prompt[:100]>' Score for this image?   assistant: + (liked) or - (disliked)

rendered with the backbone's chat template; the target is the last user turn, followed by the assistant prompt, and
the label is predicted at the last position. The answer prefix of the target is derived from the template itself
(the text between the generation prompt and the answer of a rendered assistant turn), so the target is followed by
exactly what precedes `+`/`-` in the reference turns: training and inference see identical token ids up to the label.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature


@dataclass
class ReferencePair:
    """One of a user's reference pairs: a liked and a disliked image generated from the same prompt."""

    liked: Image.Image
    disliked: Image.Image
    prompt: str = ""


@dataclass
class PreferenceQuery:
    """A user's reference pairs and one target image (with its prompt) whose like/dislike is predicted.

    `user_id` only names the user in error messages.
    """

    references: list[ReferencePair]
    image: Image.Image
    prompt: str = ""
    user_id: str | None = None


def _user_turn(text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def _assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class PreferenceSequenceBuilder:
    """Turn `PreferenceQuery`s into a left-padded batch for a `PreferencePrototypeModel`, in one processor call.

    Args:
        processor: The backbone's processor (with a chat template), e.g. `AutoProcessor.from_pretrained(...)`.
        like_token: Answer of liked references (and the positive label).
        dislike_token: Answer of disliked references (and the negative label).
        max_prompt_chars: Prompts are cut to this many characters.
        use_prompt: Show each image's prompt; if False the text is only "Score for this image?".

    Raises:
        ValueError: The chat template does not render assistant answers after its generation prompt, or the like
            and dislike answers do not tokenize to one differing token after the same prefix.

    Example:
        ```python
        >>> from imagegem_hf.preference import PreferenceQuery, PreferenceSequenceBuilder, ReferencePair
        >>> from imagegem_hf.testing import random_images, tiny_vlm
        >>> _, processor = tiny_vlm()
        >>> builder = PreferenceSequenceBuilder(processor)
        >>> a, b, c = random_images(3, size=16)
        >>> batch = builder([PreferenceQuery([ReferencePair(a, b, "a red car")], c, "a blue car")])
        >>> batch["input_ids"].shape[0]
        1
        ```
    """

    def __init__(
        self,
        processor,
        like_token: str = "+",
        dislike_token: str = "-",
        max_prompt_chars: int = 100,
        use_prompt: bool = True,
    ):
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("The processor has no chat template; load one that has (or set processor.chat_template).")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.like_token, self.dislike_token = like_token, dislike_token
        self.max_prompt_chars, self.use_prompt = max_prompt_chars, use_prompt
        self.answer_prefix = self._answer_prefix()
        self.like_token_id, self.dislike_token_id = self._label_token_ids()
        image_token = getattr(processor, "image_token", None)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token) if image_token is not None else None
        added = sorted(self.tokenizer.added_tokens_encoder, key=len, reverse=True)
        self._added_token_pattern = re.compile("|".join(map(re.escape, added))) if added else None

    @classmethod
    def from_config(cls, processor, config) -> PreferenceSequenceBuilder:
        """A builder with the tokens and prompt settings of a `PreferencePrototypeConfig`."""
        return cls(
            processor,
            like_token=config.like_token,
            dislike_token=config.dislike_token,
            max_prompt_chars=config.max_prompt_chars,
            use_prompt=config.use_prompt,
        )

    def _answer_prefix(self) -> str:
        """The text a rendered assistant answer has between the generation prompt and the answer itself."""
        messages = [_user_turn(self.turn_text("probe"))]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = self.processor.apply_chat_template(
            messages + [_assistant_turn(self.like_token)], add_generation_prompt=False, tokenize=False
        )
        start = full.find(self.like_token, len(prompt))
        if not full.startswith(prompt) or start < 0:
            raise ValueError(
                "The chat template does not render an assistant answer right after its generation prompt "
                f"(generation prompt ends {prompt[-40:]!r}, answered turn ends {full[-40:]!r}); "
                "use a processor whose template does."
            )
        return full[len(prompt) : start]

    def _label_token_ids(self) -> tuple[int, int]:
        prompt = self.render_prefix([], "probe")
        like, dislike = (
            self.tokenizer(prompt + token, add_special_tokens=False).input_ids
            for token in (self.like_token, self.dislike_token)
        )
        if len(like) != len(dislike) or like[:-1] != dislike[:-1] or like[-1] == dislike[-1]:
            raise ValueError(
                f"like_token {self.like_token!r} and dislike_token {self.dislike_token!r} must each tokenize to one "
                "token after the assistant prompt, differing only in that token; choose other answer strings."
            )
        return like[-1], dislike[-1]

    def turn_text(self, prompt: str) -> str:
        """The text after each image: the prompt (cut to `max_prompt_chars`) and the question."""
        if not self.use_prompt:
            return "Score for this image?"
        return f"The prompt is '{prompt[: self.max_prompt_chars]}' Score for this image?"

    def messages(self, references: Sequence[tuple[str, str]], target_prompt: str) -> list[dict]:
        """Chat messages for `(prompt, answer)` reference turns in order, then the target's user turn."""
        messages = []
        for prompt, answer in references:
            messages += [_user_turn(self.turn_text(prompt)), _assistant_turn(answer)]
        return messages + [_user_turn(self.turn_text(target_prompt))]

    def render_prefix(self, references: Sequence[tuple[str, str]], target_prompt: str) -> str:
        """The rendered conversation up to (excluding) the label: generation prompt plus the answer prefix."""
        messages = self.messages(references, target_prompt)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + self.answer_prefix

    def turns(self, query: PreferenceQuery, order: Sequence[int] | None = None) -> list[tuple[Image.Image, str, str]]:
        """The reference turns `(image, prompt, answer)` of `query` in `order` (default: liked, disliked per pair).

        `order` is a permutation of `range(2 * len(query.references))` over the default sequence.
        """
        turns = []
        for pair in query.references:
            turns += [(pair.liked, pair.prompt, self.like_token), (pair.disliked, pair.prompt, self.dislike_token)]
        if order is None:
            return turns
        if sorted(order) != list(range(len(turns))):
            raise ValueError(f"order must be a permutation of range({len(turns)}), got {list(order)}.")
        return [turns[i] for i in order]

    def random_orders(self, queries: Sequence[PreferenceQuery], rng: np.random.Generator) -> list[list[int]]:
        """One random permutation of the reference turns per query."""
        return [rng.permutation(2 * len(q.references)).tolist() for q in queries]

    def __call__(
        self,
        queries: Sequence[PreferenceQuery],
        orders: Sequence[Sequence[int] | None] | None = None,
        labels: Sequence[int] | None = None,
        append_label: bool = False,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Build a left-padded batch: `input_ids`, `attention_mask`, the processor's image tensors, `target_mask`
        (the target image's tokens) and, with `labels`, `labels` (1 = like, 0 = dislike).

        Args:
            queries: The queries, one row each.
            orders: Per query, a permutation of its reference turns (see `turns`), or None for the default order.
            labels: Per query 1 (liked) or 0 (disliked).
            append_label: Append the label token as a last column (the training sequence of a causal LM loss).
                The columns before it are exactly the inference input.
            return_tensors: Only `"pt"`.

        Returns:
            A `BatchFeature`.
        """
        if return_tensors != "pt":
            raise ValueError("Only return_tensors='pt' is supported.")
        if not queries:
            raise ValueError("queries is empty.")
        if append_label and labels is None:
            raise ValueError("append_label=True needs labels.")
        orders = list(orders) if orders is not None else [None] * len(queries)
        if len(orders) != len(queries) or (labels is not None and len(labels) != len(queries)):
            raise ValueError("orders and labels must have one entry per query.")
        texts, images = [], []
        for i, (query, order) in enumerate(zip(queries, orders, strict=True)):
            turns = self.turns(query, order)
            label = self.like_token if labels is None or labels[i] else self.dislike_token
            texts.append(self.render_prefix([(p, a) for _, p, a in turns], query.prompt) + label)
            images.append([im for im, _, _ in turns] + [query.image])
        encoded = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("The processor did not pad on the left; the label must sit in the last column.")
        last = input_ids[:, -1]
        if not bool(((last == self.like_token_id) | (last == self.dislike_token_id)).all()):
            raise ValueError("The rendered answer did not tokenize to the label token; check like/dislike tokens.")
        if not append_label:
            _drop_last_column(encoded)
        if self.image_token_id is not None:
            encoded["target_mask"] = last_run_mask(encoded["input_ids"], self.image_token_id)
        if labels is not None:
            encoded["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
        return encoded


class PairBatch(dict):
    """Inputs of `PreferencePrototypeModel.forward_pairs`: the shared reference prefix of each example (`prefix`,
    `B` rows) and its two target turns (`targets`, `2·B` rows: liked and disliked target of example `i` at rows
    `2i` and `2i + 1`), plus `labels` (`B` ones then `B` zeros, the order of the returned logits)."""

    def to(self, device) -> PairBatch:
        return PairBatch({k: v.to(device) for k, v in self.items()})


def _split_prefix_text(builder: PreferenceSequenceBuilder, full: str, references_text: str) -> tuple[str, str]:
    """Split a rendered sequence into the shared reference prefix and the target turn.

    The cut sits right before the first added token (`<image>`, `<|im_start|>`, ...) after the reference turns, so
    the target text starts with an added token and the prefix ends just before one. Tokenizers split text at added
    tokens, so the two parts tokenize as they do inside the whole sequence; cutting at the turn boundary instead would
    start the target with plain text, which a SentencePiece (Metaspace) tokenizer prefixes with a spurious `▁`.
    """
    if not full.startswith(references_text):
        raise ValueError(
            "The chat template renders the reference turns differently when a target turn follows, so the reference "
            "prefix cannot be shared; use the full-sequence path (PreferenceCollator(share_prefix=False))."
        )
    target = full[len(references_text) :]
    match = builder._added_token_pattern.search(target) if builder._added_token_pattern is not None else None
    cut = len(references_text) + (match.start() if match else 0)
    return full[:cut], full[cut:]


def _prefix_splits_cleanly(builder: PreferenceSequenceBuilder, prefixes: list[str], targets: list[str]) -> bool:
    """Whether prefix ids + target ids equal the ids of the whole text for every row (tokenized as the processor
    tokenizes them: special tokens added to the prefix and the whole, not to the target)."""
    tokenizer = builder.tokenizer
    whole = tokenizer([p + t for p, t in zip(prefixes, targets, strict=True)]).input_ids
    prefix_ids = tokenizer(prefixes).input_ids
    target_ids = tokenizer(targets, add_special_tokens=False).input_ids
    return all(w == p + t for w, p, t in zip(whole, prefix_ids, target_ids, strict=True))


def build_pair_batch(
    builder: PreferenceSequenceBuilder,
    liked: Sequence[PreferenceQuery],
    disliked: Sequence[PreferenceQuery],
    orders: Sequence[Sequence[int] | None] | None = None,
) -> PairBatch | BatchFeature:
    """Tokenize each example's references once (right-padded) and its liked and disliked target turns separately
    (left-padded, so the label position is the last column).

    `liked[i]` and `disliked[i]` must have the same references and prompt (they are one example's two targets);
    `orders[i]` orders both. Computing the reference prefix once halves the work of a training step (paper 003's
    loss always scores both targets of a pair with the same references).

    The prefix ids followed by the target ids are the ids of the whole sequence (the split is checked on the
    rendered texts for every batch). Should a tokenizer tokenize across the split (an added token that strips the
    whitespace before it, for instance), the batch falls back, with a warning, to the `2·B` full sequences of the
    builder, which the model scores the same way.

    Returns:
        A [`PairBatch`], or on that fallback the builder's `BatchFeature` of full sequences (liked targets first).

    Raises:
        ValueError: A query has no reference pairs (the error names its user), or the two queries of an example
            differ in their references.

    Example:
        ```python
        >>> batch = build_pair_batch(builder, [pos_query], [neg_query])  # doctest: +SKIP
        >>> model.forward_pairs(batch).shape  # doctest: +SKIP
        torch.Size([2, 2])
        ```
    """
    if len(liked) != len(disliked) or not liked:
        raise ValueError("liked and disliked must be non-empty and hold one query each per example.")
    orders = list(orders) if orders is not None else [None] * len(liked)
    prefix_texts, prefix_images, target_texts, target_images = [], [], [], []
    for i, (pos, neg, order) in enumerate(zip(liked, disliked, orders, strict=True)):
        if not pos.references:
            who = f"user {pos.user_id!r}" if pos.user_id is not None else f"example {i} of the batch"
            raise ValueError(
                f"The query of {who} has no reference pairs; a preference query needs at least one liked/disliked "
                "reference pair of that user (drop the example or give the user more pairs)."
            )
        if pos.references is not neg.references and pos.references != neg.references:
            raise ValueError("The liked and disliked query of an example must share their references.")
        turns = builder.turns(pos, order)
        references = [(p, a) for _, p, a in turns]
        messages = builder.messages(references, pos.prompt)[:-1]
        references_text = builder.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        full = builder.render_prefix(references, pos.prompt) + builder.like_token
        prefix, target = _split_prefix_text(builder, full, references_text)
        prefix_texts.append(prefix)
        prefix_images.append([im for im, _, _ in turns])
        target_texts += [target, target]
        target_images += [[pos.image], [neg.image]]
    if not _prefix_splits_cleanly(builder, prefix_texts, target_texts[::2]):
        warnings.warn(
            "The tokenizer does not tokenize the shared reference prefix and the target turn as it tokenizes the "
            "whole sequence; scoring full sequences instead (same logits, more compute).",
            stacklevel=2,
        )
        n = len(liked)
        return builder(list(liked) + list(disliked), orders=orders + orders, labels=[1] * n + [0] * n)
    processor = builder.processor
    # the prefix is padded on the right: its real tokens then never see padding, so the model can run it with a
    # plain causal mask (the fast attention path), and the padding is masked out for the targets only
    prefix = processor(
        text=prefix_texts, images=prefix_images, padding=True, padding_side="right", return_tensors="pt"
    )
    targets = processor(
        text=target_texts,
        images=target_images,
        padding=True,
        padding_side="left",
        add_special_tokens=False,
        return_tensors="pt",
    )
    if not bool(prefix["attention_mask"][:, 0].all()) or not bool(targets["attention_mask"][:, -1].all()):
        raise ValueError(
            "The processor ignored padding_side (reference prefixes are padded on the right, target turns on the "
            "left); use a processor that honours it."
        )
    if not bool((targets["input_ids"][:, -1] == builder.like_token_id).all()):
        raise ValueError("The rendered answer did not tokenize to the label token; check like/dislike tokens.")
    _drop_last_column(targets)
    batch = PairBatch({f"prefix_{k}": v for k, v in prefix.items()})
    batch.update({f"target_{k}": v for k, v in targets.items()})
    batch["labels"] = torch.tensor([1] * len(liked) + [0] * len(liked))
    return batch


def _drop_last_column(encoded: BatchFeature) -> None:
    """Drop the label column from every per-token tensor (`input_ids`, `attention_mask`, `mm_token_type_ids`, ...)."""
    shape = encoded["input_ids"].shape
    for key, value in encoded.items():
        if isinstance(value, torch.Tensor) and value.shape == shape:
            encoded[key] = value[:, :-1]


def last_run_mask(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Boolean mask of the last contiguous run of `token_id` in each row (the target image's tokens).

    Example:
        ```python
        >>> import torch
        >>> last_run_mask(torch.tensor([[5, 1, 1, 5, 1, 1, 1, 7]]), 1).int().tolist()
        [[0, 0, 0, 0, 1, 1, 1, 0]]
        ```
    """
    hits = input_ids == token_id
    # positions after the last hit and before the last run's start are excluded by scanning from the right
    flipped = hits.flip(-1).int()
    seen = flipped.cumsum(-1) > 0  # at or after (from the right) the first hit
    run_ended = (seen & (flipped == 0)).int().cumsum(-1) > 0  # a non-hit after the run started
    return (hits.flip(-1) & ~run_ended).flip(-1)
