"""Scorers against independent computations on tiny random CLIP models (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from imagegem_hf.scoring import (
    CLIPScore,
    HPSv2,
    PickScore,
    Scorer,
    convert_open_clip_state_dict,
    hpsv2_preprocess,
    open_clip_to_clip_model,
    vit_h_14_config,
)
from imagegem_hf.testing import random_images, tiny_clip_model

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
PROMPTS = ["a red car", "a dog on the beach", "", "mountains at dawn, highly detailed, " * 10]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_model(seed=3)


@pytest.fixture(scope="module")
def gelu_clip(clip):
    """A tiny CLIP with exact GELU, the activation of open_clip's ViT-H-14."""
    config = clip[0].config.to_dict()
    for tower in ("text_config", "vision_config"):
        config[tower]["hidden_act"] = "gelu"
    torch.manual_seed(7)
    return CLIPModel(CLIPConfig(**config)).eval(), clip[1]


def images_of_mixed_sizes():
    return (
        random_images(1, size=(300, 150), seed=1)
        + random_images(1, size=(100, 260), seed=2)
        + random_images(1, size=32, seed=3)
        + [random_images(1, size=(20, 50), seed=4)[0].convert("L")]
    )


def reference_embeddings(model, pixel_values, tokenizer, prompts):
    """Forward through the two towers and their projections by hand, then L2-normalise."""
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
        text_inputs = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.text_projection(
            model.text_model(
                input_ids=text_inputs["input_ids"], attention_mask=text_inputs["attention_mask"]
            ).pooler_output
        )
    return image, text


def reference_hps_pixels(image: Image.Image, size: int) -> np.ndarray:
    """open_clip's ResizeMaxSize(size, fill=0) + ToTensor + Normalize, written with numpy (CHW, float64)."""
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    resized = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.BICUBIC), dtype=np.float64) / 255.0
    canvas = np.zeros((size, size, 3))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return ((canvas - MEAN) / STD).transpose(2, 0, 1)


# -- formulas ------------------------------------------------------------------------------------------------------
def test_pickscore_matches_logit_scale_times_cosine(clip):
    model, processor = clip
    images = images_of_mixed_sizes()
    scores = PickScore(model, processor).score(images, PROMPTS, batch_size=3)
    pixel_values = processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    image, text = reference_embeddings(model, pixel_values, processor.tokenizer, PROMPTS)
    expected = model.logit_scale.detach().exp() * F.cosine_similarity(image, text, dim=-1)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (4,)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_clip_score_is_100_cosine_clamped_at_zero(clip):
    model, processor = clip
    images = images_of_mixed_sizes()
    scores = CLIPScore(model, processor).score(images, PROMPTS)
    pixel_values = processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    image, text = reference_embeddings(model, pixel_values, processor.tokenizer, PROMPTS)
    cosine = F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scores, torch.clamp(100 * cosine, min=0), rtol=1e-5, atol=1e-4)

    # A negative cosine is clamped to exactly 0: flip the image projection so every cosine changes sign.
    flipped, _ = tiny_clip_model(seed=3)
    with torch.no_grad():
        flipped.visual_projection.weight.neg_()
    flipped_scores = CLIPScore(flipped, processor).score(images, PROMPTS)
    assert torch.equal(flipped_scores == 0, cosine > 0)
    torch.testing.assert_close(flipped_scores[cosine < 0], -100 * cosine[cosine < 0], rtol=1e-5, atol=1e-4)


def test_hpsv2_is_plain_cosine_on_padded_images(clip):
    model, processor = clip
    images = images_of_mixed_sizes()
    scores = HPSv2(model, processor.tokenizer).score(images, PROMPTS, batch_size=2)
    pixel_values = torch.tensor(np.stack([reference_hps_pixels(im, 32) for im in images]), dtype=torch.float32)
    image, text = reference_embeddings(model, pixel_values, processor.tokenizer, PROMPTS)
    torch.testing.assert_close(scores, F.cosine_similarity(image, text, dim=-1), rtol=1e-5, atol=1e-5)
    # No logit scale: a cosine, whatever the model's logit_scale is.
    assert scores.abs().max() <= 1.0


def test_batch_size_and_processor_argument_do_not_change_scores(clip):
    model, processor = clip
    images = images_of_mixed_sizes()
    one_by_one = HPSv2(model, processor).score(images, PROMPTS, batch_size=1)
    all_at_once = HPSv2(model, processor.tokenizer).score(images, PROMPTS, batch_size=16)
    torch.testing.assert_close(one_by_one, all_at_once, rtol=1e-5, atol=1e-6)


def test_scorers_follow_the_protocol_and_return_float32_in_bfloat16(clip):
    model, processor = tiny_clip_model(seed=3)
    for scorer in (PickScore(model, processor), CLIPScore(model, processor), HPSv2(model, processor)):
        assert isinstance(scorer, Scorer)
    low = PickScore(model, processor, dtype=torch.bfloat16)
    assert low.model.dtype == torch.bfloat16
    scores = low.score(random_images(2), ["a", "b"])
    full = PickScore(*clip).score(random_images(2), ["a", "b"])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, full, rtol=0.05, atol=0.1)


# -- HPSv2 preprocessing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "resized", "offset"),
    [((300, 150), (224, 112), (0, 56)), ((100, 260), (86, 224), (69, 0)), ((101, 260), (87, 224), (68, 0))],
)
def test_hpsv2_preprocessing_pixel_for_pixel(size, resized, offset):
    image = random_images(1, size=size, seed=sum(size))[0]
    ours = hpsv2_preprocess([image], image_size=224)[0].numpy()
    np.testing.assert_allclose(ours, reference_hps_pixels(image, 224), rtol=0, atol=1e-5)
    # The resized image sits at the open_clip offsets; everything else is black (fill 0) after normalisation.
    (new_w, new_h), (left, top) = resized, offset
    black = (-MEAN / STD)[:, None, None]
    mask = np.ones((224, 224), bool)
    mask[top : top + new_h, left : left + new_w] = False
    np.testing.assert_allclose(ours[:, mask], np.broadcast_to(black, (3, 224, 224))[:, mask], atol=1e-5)
    content = np.asarray(image.resize((new_w, new_h), Image.BICUBIC), dtype=np.float64) / 255.0
    np.testing.assert_allclose(
        ours[:, top : top + new_h, left : left + new_w], ((content - MEAN) / STD).transpose(2, 0, 1), atol=1e-5
    )


def test_hpsv2_preprocessing_pads_an_image_whose_longest_side_is_already_the_target():
    image = random_images(1, size=(224, 100), seed=5)[0]
    ours = hpsv2_preprocess([image], image_size=224)[0].numpy()
    assert ours.shape == (3, 224, 224)
    np.testing.assert_allclose(ours, reference_hps_pixels(image, 224), atol=1e-5)


# -- open_clip conversion ------------------------------------------------------------------------------------------
def to_open_clip_layout(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The inverse mapping: a transformers CLIPModel state dict written with open_clip's names and layouts."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "logit_scale": sd["logit_scale"],
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t(),
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
    }
    towers = (("text_model", "", model.config.text_config), ("vision_model", "visual.", model.config.vision_config))
    for ours, theirs, config in towers:
        for i in range(config.num_hidden_layers):
            src, dst = f"{ours}.encoder.layers.{i}.", f"{theirs}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
                )
                out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
                out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"]
                out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"]
                out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
                out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    return out


def causal(n: int) -> torch.Tensor:
    """open_clip's additive causal attention mask."""
    return torch.full((n, n), float("-inf")).triu(1)


def open_clip_forward(sd, heads, pixel_values, input_ids):
    """open_clip's ViT CLIP forward on an open_clip-layout state dict (fused-QKV attention, `x @ proj`)."""

    def blocks(x, prefix, mask=None):
        i = 0
        while f"{prefix}{i}.ln_1.weight" in sd:
            p = f"{prefix}{i}."
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5).transpose(0, 1)
            attn = F.multi_head_attention_forward(
                h, h, h, x.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None,
                False, 0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False,
                need_weights=False, attn_mask=mask,
            )[0]  # fmt: skip
            x = x + attn.transpose(0, 1)
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
            x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                             sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])  # fmt: skip
            i += 1
        return x

    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    x = blocks(x, "visual.transformer.resblocks.")
    x = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    image = x @ sd["visual.proj"]

    length = input_ids.shape[1]
    t = sd["token_embedding.weight"][input_ids] + sd["positional_embedding"][:length]
    t = blocks(t, "transformer.resblocks.", causal(length))
    t = F.layer_norm(t, t.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    text = t[torch.arange(t.shape[0]), input_ids.argmax(dim=-1)] @ sd["text_projection"]
    return image, text


def test_open_clip_conversion_round_trips_and_matches_an_open_clip_forward(gelu_clip):
    model, processor = gelu_clip
    open_clip_sd = to_open_clip_layout(model)
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = processor.tokenizer(PROMPTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_image, ref_text = open_clip_forward(open_clip_sd, 2, pixel_values, ids["input_ids"])
        original_image = model.get_image_features(pixel_values=pixel_values).pooler_output
        original_text = model.get_text_features(**ids).pooler_output
    # The open_clip-layout weights really compute the same CLIP as the transformers model...
    torch.testing.assert_close(ref_image, original_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref_text, original_text, rtol=1e-4, atol=1e-5)

    # ...and converting them back gives the same parameters and outputs (attn_mask buffers and DDP prefixes ignored).
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in open_clip_sd.items()} | {"module.attn_mask": causal(77)}}
    converted = open_clip_to_clip_model(checkpoint, config=model.config)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            converted.get_image_features(pixel_values=pixel_values).pooler_output, original_image
        )
        torch.testing.assert_close(converted.get_text_features(**ids).pooler_output, original_text)


def test_conversion_errors_name_the_problem(gelu_clip):
    model, _ = gelu_clip
    open_clip_sd = to_open_clip_layout(model)
    with pytest.raises(ValueError, match="no transformers CLIPModel counterpart"):
        convert_open_clip_state_dict(open_clip_sd | {"text.transformer.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="do not fit the CLIP config"):
        open_clip_to_clip_model(open_clip_sd)  # the ViT-H-14 default config, tiny weights
    with pytest.raises(ValueError, match="no tensors"):
        open_clip_to_clip_model({"epoch": 3})
    assert vit_h_14_config().vision_config.hidden_size == 1280


# -- loading -------------------------------------------------------------------------------------------------------
def test_pickscore_and_clip_score_from_local_directories(clip, tmp_path):
    model, processor = clip
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "processor")
    processor.save_pretrained(tmp_path / "model")
    images = images_of_mixed_sizes()
    expected = PickScore(model, processor).score(images, PROMPTS)
    loaded = PickScore.from_pretrained(tmp_path / "model", processor_path_or_repo_id=tmp_path / "processor")
    torch.testing.assert_close(loaded.score(images, PROMPTS), expected)
    expected = CLIPScore(model, processor).score(images, PROMPTS)
    torch.testing.assert_close(CLIPScore.from_pretrained(tmp_path / "model").score(images, PROMPTS), expected)


def test_hpsv2_from_open_clip_checkpoint_and_converted_directory(gelu_clip, tmp_path):
    model, processor = gelu_clip
    processor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    open_clip_sd = to_open_clip_layout(model)
    repo = tmp_path / "HPSv2"
    repo.mkdir()
    torch.save({"state_dict": open_clip_sd}, repo / "HPS_v2.1_compressed.pt")
    torch.save({k: v.half() for k, v in open_clip_sd.items()}, repo / "HPS_v2_compressed.pt")
    images, tokenizer_dir = images_of_mixed_sizes(), tmp_path / "tokenizer"
    expected = HPSv2(model, processor.tokenizer).score(images, PROMPTS)

    kwargs = dict(clip_config=model.config, tokenizer_path_or_repo_id=tokenizer_dir)
    v21 = HPSv2.from_pretrained(repo, version="v2.1", **kwargs)
    torch.testing.assert_close(v21.score(images, PROMPTS), expected)
    v20 = HPSv2.from_pretrained(repo, version="v2.0", **kwargs)
    assert v20.model.dtype == torch.float32  # half-precision checkpoint, cast to the requested dtype
    torch.testing.assert_close(v20.score(images, PROMPTS), expected, rtol=0, atol=5e-3)

    saved = v21.save_pretrained(tmp_path / "converted")
    assert (saved / "model.safetensors").is_file()
    reloaded = HPSv2.from_pretrained(saved)  # config and tokenizer both come from the directory
    torch.testing.assert_close(reloaded.score(images, PROMPTS), expected)
    with pytest.raises(FileExistsError):
        v21.save_pretrained(saved)


def test_hpsv2_loading_errors(gelu_clip, tmp_path):
    with pytest.raises(ValueError, match="Unsupported HPSv2 version"):
        HPSv2.from_pretrained(tmp_path, version="v3")
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        HPSv2.from_pretrained(tmp_path, version="v2.1")
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        HPSv2.from_pretrained(tmp_path / "missing")
    torch.save([torch.zeros(1)], tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        HPSv2.from_pretrained(tmp_path, version="v2.0")


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer_cls", [PickScore, CLIPScore, HPSv2])
def test_bad_input_is_rejected_with_a_clear_error(clip, scorer_cls):
    scorer = scorer_cls(*clip)
    images = random_images(2)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images, ["only one"])
    with pytest.raises(ValueError, match="empty"):
        scorer.score([], [])
    with pytest.raises(ValueError, match="list of strings"):
        scorer.score(images[:1], "a cat")
    with pytest.raises(ValueError, match="batch_size"):
        scorer.score(images, ["a", "b"], batch_size=0)
    with pytest.raises(ValueError, match="not a PIL.Image.Image"):
        scorer.score([np.zeros((4, 4, 3), np.uint8)], ["a"])
    with pytest.raises(ValueError, match="not a string"):
        scorer.score(images[:1], [None])
