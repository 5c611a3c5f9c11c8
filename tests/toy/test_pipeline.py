import json
import math
import subprocess
import sys

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
