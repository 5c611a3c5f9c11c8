import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from imagegem_hf.preference import (
    PreferencePrototypeConfig,
    PreferencePrototypeModel,
    PreferenceQuery,
    PreferenceSequenceBuilder,
    ReferencePair,
)
from imagegem_hf.preference.sequence import build_pair_batch, last_run_mask
from imagegem_hf.testing import random_images, tiny_vlm


@pytest.fixture(scope="module")
def tiny():
    backbone, processor = tiny_vlm(seed=0)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=4, n_ref=2)
    with torch.no_grad():  # larger prototypes so that their effect is far above float noise
        model.prototypes.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    return model.eval(), builder, processor


def queries():
    ims = random_images(8, size=16, seed=1)
    long_query = PreferenceQuery(
        [ReferencePair(ims[0], ims[1], "a red car at dusk"), ReferencePair(ims[2], ims[3], "blue sky")], ims[4], "x"
    )
    short_query = PreferenceQuery([ReferencePair(ims[5], ims[6], "cat")], ims[7], "a dog")
    return long_query, short_query


def backbone_call(model, batch, **kwargs):
    """The backbone run directly on the prototype-prefixed embeddings (all positions' logits)."""
    embeds, mask, positions, _ = model.prepend_prototypes(
        model.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"]
    )
    return model.backbone(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, pixel_values=batch["pixel_values"], **kwargs
    )


def test_padded_and_unpadded_rows_give_the_same_logits(tiny):
    model, builder, _ = tiny
    long_query, short_query = queries()
    batch = builder([long_query, short_query])
    assert (batch["attention_mask"][1] == 0).any(), "the short row must be padded for this test"
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**builder([short_query])).logits
        first = model(**builder([long_query])).logits
    torch.testing.assert_close(together[1], alone[0], atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(together[0], first[0], atol=1e-7, rtol=1e-4)


def test_padding_is_masked_after_prepending_prototypes(tiny):
    model, builder, _ = tiny
    _, short_query = queries()
    batch = builder([short_query, queries()[0]])
    mask = batch["attention_mask"]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    _, full_mask, positions, _ = model.prepend_prototypes(embeds, mask)
    assert full_mask.shape[1] == mask.shape[1] + 4
    assert full_mask[:, :4].all() and torch.equal(full_mask[:, 4:], mask)
    # real tokens are numbered consecutively after the prototypes, whatever the padding
    for row in range(2):
        real = positions[row, 4:][mask[row].bool()]
        assert real.tolist() == list(range(4, 4 + int(mask[row].sum())))


def test_prototypes_change_the_output(tiny):
    model, builder, _ = tiny
    batch = builder(list(queries()))
    with torch.no_grad():
        before = model(**batch).logits.clone()
        saved = model.prototypes.detach().clone()
        model.prototypes.add_(torch.randn_like(saved, generator=torch.Generator().manual_seed(3)))
        after = model(**batch).logits
        model.prototypes.copy_(saved)
    assert (before - after).abs().max() > 1e-5  # 100× above the padded-vs-unpadded tolerance


def test_p_like_is_the_softmax_over_the_label_logits(tiny):
    model, builder, _ = tiny
    batch = builder(list(queries()))
    with torch.no_grad():
        out = model(**batch)
        direct = backbone_call(model, batch).logits[:, -1]
    like, dislike = direct[:, builder.like_token_id], direct[:, builder.dislike_token_id]
    torch.testing.assert_close(out.logits, torch.stack([like, dislike], dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.p_like, torch.sigmoid(like - dislike), atol=1e-5, rtol=1e-4)


def test_training_and_inference_sequences_match_up_to_the_label(tiny):
    _, builder, processor = tiny
    query, _ = queries()
    inference = builder([query])
    for label, token_id in ((1, builder.like_token_id), (0, builder.dislike_token_id)):
        training = builder([query], labels=[label], append_label=True)
        assert torch.equal(training["input_ids"][0, :-1], inference["input_ids"][0])
        assert training["input_ids"][0, -1].item() == token_id
    # the label token is the one the reference turns use after "ASSISTANT:" (" +" renders as " " then "+"),
    # and the answer prefix comes from the template, so the target's answer is tokenized like a reference answer
    assert builder.answer_prefix == " "
    rendered = processor.apply_chat_template(
        builder.messages([("a red car at dusk", "+")], "x") + [{"role": "assistant", "content": "+"}], tokenize=False
    )
    answered = processor.tokenizer(rendered, add_special_tokens=False).input_ids
    plus = processor.tokenizer.convert_tokens_to_ids("+")
    assert builder.like_token_id == plus
    assert answered.count(plus) == 2  # the reference answer and the target's answer: same token both times


def test_reference_order_and_prompt_settings():
    _, processor = tiny_vlm()
    query, _ = queries()
    builder = PreferenceSequenceBuilder(processor, max_prompt_chars=5)
    default = builder.turns(query)
    assert [a for _, _, a in default] == ["+", "-", "+", "-"]
    reordered = builder.turns(query, [3, 0, 2, 1])
    assert reordered == [default[3], default[0], default[2], default[1]]
    assert builder.turn_text("a red car at dusk") == "The prompt is 'a red' Score for this image?"
    assert PreferenceSequenceBuilder(processor, use_prompt=False).turn_text("x") == "Score for this image?"
    orders = builder.random_orders([query, query], np.random.default_rng(0))
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    with pytest.raises(ValueError, match="permutation"):
        builder.turns(query, [0, 0, 1, 2])


def test_target_mask_marks_the_target_image_tokens(tiny):
    _, builder, processor = tiny
    batch = builder(list(queries()))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    tokens_per_image = (batch["input_ids"][1] == image_id).sum().item() // 3  # short query: 2 references + target
    assert batch["target_mask"].sum(dim=1).tolist() == [tokens_per_image, tokens_per_image]
    assert last_run_mask(torch.tensor([[5, 1, 1, 5, 1, 7]]), 1).int().tolist() == [[0, 0, 0, 0, 1, 0]]


def test_prototype_attention_sums_target_attention_to_prototypes(tiny):
    model, builder, _ = tiny
    batch = builder(list(queries()))
    with pytest.raises(ValueError, match="eager"):
        model(**batch, output_prototype_attention=True)
    model.backbone.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch, output_prototype_attention=True)
            raw = backbone_call(model, batch, output_attentions=True).attentions
    finally:
        model.backbone.set_attn_implementation("sdpa")
    assert out.prototype_attention.shape == (2, 4)
    for row in range(2):
        rows = batch["target_mask"][row].nonzero().squeeze(1) + 4
        expected = torch.stack([a[row][:, rows, :4].mean(dim=(0, 1)) for a in raw]).mean(0)
        torch.testing.assert_close(out.prototype_attention[row], expected, atol=1e-6, rtol=1e-4)


def test_save_and_load_round_trip_gives_identical_logits(tiny, tmp_path):
    model, builder, _ = tiny
    batch = builder(list(queries()))
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, PreferencePrototypeConfig) and config.num_prototypes == 4
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, PreferencePrototypeModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_config_validation():
    with pytest.raises(ValueError, match="use_prompt must be a bool"):
        PreferencePrototypeConfig(use_prompt="0")
    with pytest.raises(ValueError, match="must differ"):
        PreferencePrototypeConfig(like_token="+", dislike_token="+")
    with pytest.raises(ValueError, match="from_backbone"):
        backbone, _ = tiny_vlm()
        PreferencePrototypeModel(PreferencePrototypeConfig(backbone_config=backbone.config))


def test_shared_prefix_path_matches_full_sequences_in_logits_and_gradients(tiny):
    model, builder, _ = tiny
    ims = random_images(10, size=16, seed=4)
    refs = [
        [ReferencePair(ims[0], ims[1], "red car"), ReferencePair(ims[2], ims[3], "a blue sky")],
        [ReferencePair(ims[4], ims[5], "a much longer prompt for padding")],
    ]
    liked = [PreferenceQuery(refs[0], ims[6], "x"), PreferenceQuery(refs[1], ims[7], "a longer target prompt")]
    disliked = [PreferenceQuery(refs[0], ims[8], "x"), PreferenceQuery(refs[1], ims[9], "a longer target prompt")]
    orders = [[3, 0, 2, 1], None]
    prefix_mask = build_pair_batch(builder, liked, disliked, orders)["prefix_attention_mask"]
    # the prefixes differ in length and are padded on the right (run with causal attention only)
    assert prefix_mask[:, 0].all() and not prefix_mask[:, -1].all()
    grads = []
    for batch in (build_pair_batch(builder, liked, disliked, orders), builder(liked + disliked, orders=orders * 2)):
        model.zero_grad()
        logits = model(**batch).logits
        (logits[:, 0] * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
        grads.append((logits.detach(), model.prototypes.grad.clone()))
    model.zero_grad()
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-7, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prototypes_stay_float32_with_a_half_precision_backbone(dtype, tmp_path):
    backbone, processor = tiny_vlm(seed=0)
    model, builder = PreferencePrototypeModel.from_backbone(backbone.to(dtype), processor, num_prototypes=4, n_ref=2)
    assert model.prototypes.dtype == torch.float32 and model.backbone.dtype == dtype
    # the prototypes enter the backbone in its dtype; the gradient comes back to them in float32
    batch = builder(list(queries()))
    logits = model(**batch).logits
    with torch.no_grad():
        half = model.prototypes.detach().to(dtype)
        embeds = torch.cat([half.expand(2, -1, -1), model.get_input_embeddings()(batch["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(2, 4, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], dim=1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        direct = model.backbone(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, pixel_values=batch["pixel_values"]
        ).logits[:, -1, [builder.like_token_id, builder.dislike_token_id]]
    torch.testing.assert_close(logits, direct.float(), atol=0, rtol=0)
    logits[:, 0].sum().backward()
    assert model.prototypes.grad.dtype == torch.float32 and model.prototypes.grad.abs().sum() > 0
    # saved and loaded in that dtype, and a stage-1 model loaded with new prototypes: float32 prototypes
    model.save_pretrained(tmp_path / "full")
    loaded = PreferencePrototypeModel.from_pretrained(tmp_path / "full", dtype=dtype)
    assert loaded.prototypes.dtype == torch.float32 and loaded.backbone.dtype == dtype
    assert torch.equal(loaded.prototypes, model.prototypes)
    stage1, _ = PreferencePrototypeModel.from_backbone(tiny_vlm(seed=0)[0], processor, num_prototypes=0, n_ref=2)
    stage1.save_pretrained(tmp_path / "stage1")
    stage2 = PreferencePrototypeModel.from_pretrained(tmp_path / "stage1", dtype=dtype, num_prototypes=4)
    assert stage2.prototypes.dtype == torch.float32 and stage2.backbone.dtype == dtype


def test_base_model_prefix_names_the_backbone(tiny):
    model, _, _ = tiny
    assert getattr(model, model.base_model_prefix) is model.backbone
    assert model.base_model is model.backbone


@pytest.mark.parametrize("model_type", ["llava", "idefics2", "qwen2_vl", "blip-2"])
def test_attention_implementations_follow_the_backbone(model_type):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    backbone_config = AutoConfig.for_model(model_type)
    config = PreferencePrototypeConfig(backbone_config=backbone_config, like_token_id=1, dislike_token_id=2)
    backbone_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config.backbone_config)]
    with torch.device("meta"):
        model = PreferencePrototypeModel(config)
    for attribute in ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn"):
        assert getattr(model, attribute) == getattr(backbone_class, attribute), attribute
    if model_type == "blip-2":  # its Q-Former has no flash attention
        assert not model._supports_flash_attn
        with pytest.raises(ValueError, match="does not support Flash Attention"):
            model.set_attn_implementation("flash_attention_2")
