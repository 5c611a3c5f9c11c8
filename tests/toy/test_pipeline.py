import json
import math
import subprocess
import sys

import pytest

from imagegem_hf.toy import TOY_PIPELINE_PATH, full_prompts, load_toy_pipeline, prompt_following


def test_shipped_pipeline_is_small_and_in_the_hub_layout():
    files = [p for p in TOY_PIPELINE_PATH.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    index = json.loads((TOY_PIPELINE_PATH / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]


def test_shipped_pipeline_loads_with_plain_diffusers():
    code = (
        "import sys; from diffusers import StableDiffusionPipeline; "
        f"pipe = StableDiffusionPipeline.from_pretrained({str(TOY_PIPELINE_PATH)!r}); "
        "assert 'imagegem_hf' not in sys.modules; "
        "print(pipe('a red circle', num_inference_steps=2, output_type='np').images.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "(1, 32, 32, 3)"


def test_shipped_base_follows_prompts_above_chance():
    result = prompt_following(load_toy_pipeline(), full_prompts(), seeds=[0, 1], num_inference_steps=10)
    accuracy = result.accuracy
    print(result.summary())
    # 216 named attributes, chance 1/3: a uniform guesser's accuracy has standard deviation sqrt(p(1 − p)/n) ≈ 0.032,
    # so chance + 3 standard deviations rejects "no better than chance" at p < 0.002.
    n, chance = accuracy["n"], accuracy["chance"]
    assert n == 216 and abs(chance - 1 / 3) < 1e-9
    assert accuracy["mean"] > chance + 3 * math.sqrt(chance * (1 - chance) / n)
    # and every attribute on its own (72 images each): a model that learnt only the background fails here
    for attribute, values in (("colour", 6), ("shape", 3), ("background", 2)):
        p = 1 / values
        assert accuracy[attribute] > p + 3 * math.sqrt(p * (1 - p) / 72), attribute


@pytest.mark.xfail(
    strict=True,
    reason="The shipped toy VAE, trained on ungraded renders only, erases most of a background tint and turns "
    "exposure into tint; one trained with `ToyTrainingConfig(vae_graded=True)` passes (README, W2W in the toy world).",
)
def test_toy_vae_keeps_the_two_colour_grades_apart():
    import torch

    from imagegem_hf.toy.loras import UserStyle, _pixels, style_images, style_measures

    pipe = load_toy_pipeline()
    images, _ = style_images(UserStyle(0.0, 0.0), 16, seed=3)

    def round_trip(style: UserStyle) -> dict:
        graded = [style.grade(image) for image in images]
        with torch.no_grad():
            decoded = pipe.vae.decode(pipe.vae.encode(_pixels(graded)).latent_dist.mean).sample
        measured = style_measures(pipe.image_processor.postprocess(decoded, output_type="pil"))
        return {name: float(values.mean()) for name, values in measured.items()}

    def change(attribute: str, measured: str) -> float:
        low, high = (UserStyle(**{"warmth": 0.0, "brightness": 0.0, attribute: sign}) for sign in (-1.0, 1.0))
        return round_trip(high)[measured] - round_trip(low)[measured]

    graded = style_measures([UserStyle(1.0, 0.0).grade(images[0]), UserStyle(-1.0, 0.0).grade(images[0])])
    tint = float(graded["warmth"][0] - graded["warmth"][1])
    # measured on the shipped base: the tint keeps 0.024 of 0.43, exposure moves R − B by 0.058
    # (with `vae_graded=True`: 0.28 and 0.027)
    assert change("warmth", "warmth") >= 0.5 * tint
    assert abs(change("brightness", "warmth")) <= 0.2 * change("warmth", "warmth")
