"""A saved W2WEditPipeline loads with plain diffusers: `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` in a process that cannot import imagegem_hf (the pipeline file and the WeightSpace code are
saved in the folder), and gives the same edited weights and images as the in-process pipeline; its weight space
folder alone loads with `diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)`."""

from __future__ import annotations

import json
import re
import shutil

import huggingface_hub
import numpy as np
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from imagegem_hf.artifacts import run_without_imagegem
from imagegem_hf.testing import tiny_sd_pipeline
from imagegem_hf.w2w import W2WEditPipeline, WeightSpace, lora_target_shapes, preference_direction, save_lora
from imagegem_hf.w2w.demo import ATTENTION_TARGETS, synthetic_loras

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
SPACE_CODE = {"space.py", "lora_io.py", "reduce.py", "vectorize.py"}
CALL = dict(prompt="a portrait", strengths=[-1.0, 0.0, 2.0], seed=0, num_inference_steps=2, height=32, width=32)

REMOTE_LOAD = """
import json
import numpy as np
from diffusers import AutoModel, DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module
from safetensors.torch import save_file

root = {root!r}
call = json.loads({call!r})
pipe = DiffusionPipeline.from_pretrained(f"{{root}}/pipe", trust_remote_code=True)
assert type(pipe).__name__ == "W2WEditPipeline" and type(pipe).__module__.startswith("diffusers_modules."), type(pipe)
assert type(pipe.weight_space).__name__ == "WeightSpace", type(pipe.weight_space)
pipe.set_progress_bar_config(disable=True)
direction = np.load(f"{{root}}/direction.npy")
edited = pipe.weight_space.edit(f"{{root}}/user.safetensors", direction, 2.0)
save_file(edited.to_diffusers_state_dict(), f"{{root}}/remote_edit.safetensors")
out = pipe(lora=f"{{root}}/user.safetensors", direction=direction, **call)
np.save(f"{{root}}/remote_images.npy", np.stack([np.asarray(image) for image in out.images]))
# the saved file defines exactly one pipeline, so it also loads as a custom_pipeline file without a class name
found = get_class_from_dynamic_module(f"{{root}}/pipe", module_file="pipeline_w2w.py", trust_remote_code=True)
assert found.__name__ == "W2WEditPipeline", found
# the weight space folder alone loads with diffusers' AutoModel (its config.json has an auto_map)
space = AutoModel.from_pretrained(f"{{root}}/pipe/weight_space", trust_remote_code=True)
np.save(f"{{root}}/remote_projection.npy", space.project(f"{{root}}/user.safetensors"))
"""


def test_w2w_pipeline_loads_with_trust_remote_code_without_imagegem(tmp_path, monkeypatch):
    sd = tiny_sd_pipeline(seed=0)
    loras, labels, _ = synthetic_loras(lora_target_shapes(sd.unet, ATTENTION_TARGETS), n=12, seed=2)
    space = WeightSpace.build(loras, n_components=5, show_progress=False, align_signs=True)  # all of its code
    direction = preference_direction(space, None, labels, test_fraction=0)
    pipe = W2WEditPipeline(**{k: sd.components[k] for k in COMPONENTS}, weight_space=space)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    save_lora(loras[0], tmp_path / "user.safetensors")
    np.save(tmp_path / "direction.npy", np.asarray(direction.vector, dtype=np.float32))

    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_w2w", "W2WEditPipeline"]
    assert index["weight_space"] == ["space", "WeightSpace"]
    assert SPACE_CODE == {p.name for p in (tmp_path / "pipe" / "weight_space").glob("*.py")}
    card = ModelCard.load(tmp_path / "pipe" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "trust_remote_code=True" in card.text
    space_config = json.loads((tmp_path / "pipe" / "weight_space" / "config.json").read_text())
    assert space_config["auto_map"] == {"AutoModel": "space.WeightSpace"}
    saved_code = [tmp_path / "pipe" / "pipeline_w2w.py", *(tmp_path / "pipe" / "weight_space").glob("*.py")]
    assert not any(re.search(r"^\s*(from|import) imagegem_hf", p.read_text(), re.MULTILINE) for p in saved_code)

    # with imagegem_hf the saved code is not run: the library's own classes load the folder
    loaded = W2WEditPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is W2WEditPipeline and type(loaded.weight_space) is WeightSpace

    result = run_without_imagegem(REMOTE_LOAD.format(root=str(tmp_path), call=json.dumps(CALL)))
    assert result.ok, result.output

    expected_edit = space.edit(tmp_path / "user.safetensors", direction.vector, 2.0).to_diffusers_state_dict()
    remote_edit = load_file(tmp_path / "remote_edit.safetensors")
    assert remote_edit.keys() == expected_edit.keys()
    for key, value in expected_edit.items():
        torch.testing.assert_close(remote_edit[key], value, atol=0, rtol=0)
    expected = pipe(lora=tmp_path / "user.safetensors", direction=direction, **CALL)
    expected_images = np.stack([np.asarray(image) for image in expected.images])
    remote_images = np.load(tmp_path / "remote_images.npy")
    np.testing.assert_array_equal(remote_images, expected_images)
    assert len({image.tobytes() for image in expected_images}) == 3  # the strengths change the image
    projection = space.project(tmp_path / "user.safetensors")
    np.testing.assert_array_equal(np.load(tmp_path / "remote_projection.npy"), projection)

    # push_to_hub uploads the same complete folder (code and card included)
    class FakeHub:  # "uploads" by copying the folder
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            pass

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message, ignore_patterns=()):
            shutil.copytree(folder_path, tmp_path / "hub" / repo_id, ignore=shutil.ignore_patterns(*ignore_patterns))
            return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    assert pipe.push_to_hub("me/w2w") == "https://huggingface.co/me/w2w/commit/1"
    pushed = tmp_path / "hub" / "me/w2w"
    assert json.loads((pushed / "model_index.json").read_text()) == index
    assert (pushed / "pipeline_w2w.py").is_file() and (pushed / "weight_space" / "space.py").is_file()
    assert ModelCard.load(pushed / "README.md").data.library_name == "diffusers"
