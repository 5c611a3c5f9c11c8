"""PreferencePrototypeModel on every supported backbone family: LLaVA, Idefics2, Idefics3 (SmolVLM), Qwen2-VL."""

import pytest
import torch
from transformers import AutoConfig, AutoModel

from imagegem_hf.preference import (
    PreferencePrototypeConfig,
    PreferencePrototypeModel,
    PreferenceQuery,
    ReferencePair,
)
from imagegem_hf.preference.sequence import build_pair_batch
from imagegem_hf.preference.tiny_backbones import tiny_idefics2, tiny_idefics3, tiny_qwen2_vl
from imagegem_hf.testing import random_images, tiny_vlm

BACKBONES = {"llava": tiny_vlm, "idefics2": tiny_idefics2, "idefics3": tiny_idefics3, "qwen2_vl": tiny_qwen2_vl}


@pytest.fixture(scope="module", params=list(BACKBONES))
def tiny(request):
    backbone, processor = BACKBONES[request.param](seed=0)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=4, n_ref=2)
    with torch.no_grad():  # larger prototypes so that their effect is far above float noise
        model.prototypes.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    return model.eval(), builder, processor


def queries():
    ims = random_images(10, size=16, seed=1)
    long_refs = [ReferencePair(ims[0], ims[1], "a red car at dusk"), ReferencePair(ims[2], ims[3], "blue sky")]
    short_refs = [ReferencePair(ims[5], ims[6], "cat")]
    liked = [PreferenceQuery(long_refs, ims[4], "x"), PreferenceQuery(short_refs, ims[7], "a dog")]
    disliked = [PreferenceQuery(long_refs, ims[8], "x"), PreferenceQuery(short_refs, ims[9], "a dog")]
    return liked, disliked


def backbone_logits(backbone, batch, builder) -> torch.Tensor:
    """The backbone's own forward on the processor batch (its own positions and mask): label logits at the end."""
    inputs = {k: v for k, v in batch.items() if k not in ("target_mask", "labels")}
    return backbone(**inputs).logits[:, -1, [builder.like_token_id, builder.dislike_token_id]]


def test_without_prototypes_the_model_is_the_backbone(tiny):
    model, builder, _ = tiny
    plain, _ = PreferencePrototypeModel.from_backbone(model.backbone, builder.processor, num_prototypes=0, n_ref=2)
    liked, _ = queries()
    for query in liked:  # unpadded rows: the backbone computes its own positions (Qwen2-VL: 3-D M-RoPE)
        batch = builder([query])
        with torch.no_grad():
            torch.testing.assert_close(plain(**batch).logits, backbone_logits(model.backbone, batch, builder))


def test_padded_and_unpadded_rows_give_the_same_logits_and_positions(tiny):
    model, builder, _ = tiny
    liked, _ = queries()
    batch = builder(liked)
    assert (batch["attention_mask"][1] == 0).any(), "the short row must be padded for this test"
    with torch.no_grad():
        together = model(**batch).logits
        alone = [model(**builder([q])).logits[0] for q in liked]
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-7, rtol=1e-4)
    # the padded row's real tokens get the positions the row has alone (Qwen2-VL: 3-D), numbered after 4 prototypes
    positions, next_start = model.position_ids(
        batch["attention_mask"], batch["input_ids"], 4, batch.get("image_grid_thw")
    )
    single = builder([liked[1]])
    alone, alone_next = model.position_ids(
        single["attention_mask"], single["input_ids"], 4, single.get("image_grid_thw")
    )
    real = batch["attention_mask"][1].bool()
    assert torch.equal(positions[..., 1, :][..., real], alone[..., 0, :])
    assert alone.min().item() == 4 and next_start[1] == alone_next[0] == alone.max() + 1


def test_shared_prefix_path_matches_full_sequences(tiny):
    model, builder, _ = tiny
    liked, disliked = queries()
    with torch.no_grad():
        shared = model(**build_pair_batch(builder, liked, disliked)).logits
        full = model(**builder(liked + disliked)).logits
    torch.testing.assert_close(shared, full, atol=1e-6, rtol=1e-4)


def test_training_and_inference_templates_match_up_to_the_label(tiny):
    _, builder, processor = tiny
    query = queries()[0][0]
    inference = builder([query])
    turns = builder.turns(query)
    for label, token_id, answer in ((1, builder.like_token_id, "+"), (0, builder.dislike_token_id, "-")):
        training = builder([query], labels=[label], append_label=True)
        assert torch.equal(training["input_ids"][0, :-1], inference["input_ids"][0])
        assert training["input_ids"][0, -1].item() == token_id
        # the training sequence is the start of the template's own rendering of the answered conversation
        messages = builder.messages([(p, a) for _, p, a in turns], query.prompt)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        rendered = processor.apply_chat_template(messages, tokenize=False)
        answered = processor(text=[rendered], images=[[im for im, _, _ in turns] + [query.image]], return_tensors="pt")
        length = training["input_ids"].shape[1]
        assert torch.equal(answered["input_ids"][0, :length], training["input_ids"][0])


def test_save_and_load_round_trip_gives_identical_logits(tiny, tmp_path):
    model, builder, _ = tiny
    batch = builder(queries()[0])
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.backbone_config.model_type == model.config.backbone_config.model_type
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, PreferencePrototypeModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [("gemma3", "token_type_ids"), ("qwen3_vl", "rotary positions"), ("glm4v", "rotary positions")],
)
def test_unsupported_backbones_raise_naming_the_backbone(model_type, reason):
    config = PreferencePrototypeConfig(
        backbone_config=AutoConfig.for_model(model_type), like_token_id=1, dislike_token_id=2
    )
    with torch.device("meta"), pytest.raises(NotImplementedError, match=rf"'{model_type}' backbone.*{reason}"):
        PreferencePrototypeModel(config)  # on the meta device: nothing is allocated should it not raise
