"""The shared-prefix batch sees the token ids of the whole sequence, for byte-level and SentencePiece tokenizers."""

import pytest
import torch
from tokenizers import AddedToken

from imagegem_hf.preference import PreferencePrototypeModel, PreferenceQuery, ReferencePair
from imagegem_hf.preference.sequence import PairBatch, build_pair_batch
from imagegem_hf.preference.tiny_backbones import (
    tiny_idefics2,
    tiny_idefics3,
    tiny_metaspace_tokenizer,
    tiny_qwen2_vl,
)
from imagegem_hf.testing import random_images, tiny_vlm

# Llama 2 chat layout: "[INST] user [/INST] answer </s>"; the answer follows the generation prompt after a space
LLAMA2_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %} [/INST]{% else %} {{ message['content'][0]['text'] }} </s>{% endif %}{% endfor %}"
)

BACKBONES = {
    "llava": tiny_vlm,
    "idefics2": tiny_idefics2,
    "idefics3": tiny_idefics3,
    "qwen2_vl": tiny_qwen2_vl,
    "idefics2-metaspace": lambda seed: tiny_idefics2(seed=seed, tokenizer=tiny_metaspace_tokenizer()),
    "idefics2-metaspace-llama2-template": lambda seed: tiny_idefics2(
        seed=seed, tokenizer=tiny_metaspace_tokenizer(), chat_template=LLAMA2_STYLE_CHAT_TEMPLATE
    ),
}


def wrap(backbone_and_processor):
    model, builder = PreferencePrototypeModel.from_backbone(*backbone_and_processor, num_prototypes=4, n_ref=2)
    with torch.no_grad():  # larger prototypes so that their effect is far above float noise
        model.prototypes.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    return model.eval(), builder


def examples():
    ims = random_images(10, size=16, seed=2)
    refs = [
        [ReferencePair(ims[0], ims[1], "a red car at dusk"), ReferencePair(ims[2], ims[3], "The blue sky")],
        [ReferencePair(ims[4], ims[5], "cat")],
    ]
    liked = [PreferenceQuery(refs[0], ims[6], "x"), PreferenceQuery(refs[1], ims[7], "User: a dog")]
    disliked = [PreferenceQuery(refs[0], ims[8], "x"), PreferenceQuery(refs[1], ims[9], "User: a dog")]
    return liked, disliked, [[2, 0, 3, 1], None]


def real(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_prefix_ids_then_target_ids_are_the_ids_of_the_whole_sequence(name):
    model, builder = wrap(BACKBONES[name](seed=0))
    liked, disliked, orders = examples()
    pairs = build_pair_batch(builder, liked, disliked, orders)
    assert isinstance(pairs, PairBatch)  # the shared prefix is used, not the full-sequence fallback
    whole = builder(liked + disliked, orders=orders * 2)
    n = len(liked)
    for i in range(n):
        prefix = real(pairs["prefix_input_ids"][i], pairs["prefix_attention_mask"][i])
        for j in range(2):  # liked, disliked target
            target = real(pairs["target_input_ids"][2 * i + j], pairs["target_attention_mask"][2 * i + j])
            expected = real(whole["input_ids"][j * n + i], whole["attention_mask"][j * n + i])
            assert prefix + target == expected, (name, i, j)
    if "metaspace" in name:  # the two evaluations (shared prefix and full sequences) give the same logits
        with torch.no_grad():
            torch.testing.assert_close(model(**pairs).logits, model(**whole).logits, atol=1e-5, rtol=0)


def test_a_tokenizer_that_merges_across_the_split_falls_back_to_full_sequences():
    # the image tokens strip the space before them inside the whole text, but the prefix alone ends with that space
    backbone, processor = tiny_idefics2(
        seed=0, tokenizer=tiny_metaspace_tokenizer(), chat_template=LLAMA2_STYLE_CHAT_TEMPLATE
    )
    stripping = [AddedToken(t, lstrip=True, special=True) for t in ("<image>", "<fake_token_around_image>")]
    processor.tokenizer.add_special_tokens({"additional_special_tokens": stripping})
    model, builder = wrap((backbone, processor))
    liked, disliked, orders = examples()
    with pytest.warns(UserWarning, match="full sequences"):
        batch = build_pair_batch(builder, liked, disliked, orders)
    whole = builder(liked + disliked, orders=orders * 2, labels=[1, 1, 0, 0])
    assert not isinstance(batch, PairBatch) and torch.equal(batch["input_ids"], whole["input_ids"])
    assert batch["labels"].tolist() == [1, 1, 0, 0]


def test_a_query_without_references_is_refused_naming_its_user():
    _, builder = wrap(tiny_vlm(seed=0))
    ims = random_images(4, size=16, seed=3)
    with_refs = PreferenceQuery([ReferencePair(ims[0], ims[1], "a cat")], ims[2], "x", user_id="u1")
    empty = PreferenceQuery([], ims[3], "x", user_id="u7")
    with pytest.raises(ValueError, match="user 'u7' has no reference pairs"):
        build_pair_batch(builder, [with_refs, empty], [with_refs, empty])


def test_the_metaspace_tokenizer_marks_only_the_first_piece():
    tokenizer = tiny_metaspace_tokenizer()

    def tokens(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)

    assert tokens("User: +") == ["<s>", "▁User", ":", "▁+"]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokens("<image>User:") == ["<s>", "<image>", "User", ":"]  # no `▁` after an added token
