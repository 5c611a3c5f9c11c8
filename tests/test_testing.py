"""The tiny offline components are the base of every other test: check that they really run."""

import torch

from imagegem_hf.testing import random_images, tiny_clip_model, tiny_clip_tokenizer, tiny_sd_pipeline, tiny_vlm


def test_random_images_are_seeded():
    a, b = random_images(2, size=(8, 4), seed=3), random_images(2, size=(8, 4), seed=3)
    assert [im.size for im in a] == [(8, 4), (8, 4)]
    assert a[0].tobytes() == b[0].tobytes() and a[0].tobytes() != a[1].tobytes()


def test_tiny_clip_tokenizer_round_trips_text():
    tok = tiny_clip_tokenizer()
    ids = tok("a red car").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red car"


def test_tiny_clip_model_is_seeded():
    (m1, proc), (m2, _) = tiny_clip_model(seed=1), tiny_clip_model(seed=1)
    inputs = proc(text=["a", "b c"], images=random_images(2), return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(m1(**inputs).logits_per_image, m2(**inputs).logits_per_image)


def test_tiny_sd_pipelines_generate():
    for sdxl in (False, True):
        pipe = tiny_sd_pipeline(sdxl=sdxl)
        out = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np").images
        assert out.shape == (1, 32, 32, 3)


def test_tiny_vlm_generates_with_batched_images():
    model, processor = tiny_vlm()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "USER: <image>Describe.ASSISTANT:"
    inputs = processor(
        images=random_images(2, size=16), text=[text, text + " more"], return_tensors="pt", padding=True
    )
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs.input_ids.shape[1] + 3)
