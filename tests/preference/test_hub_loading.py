"""A saved PreferencePrototypeModel loads with plain transformers: `AutoModel.from_pretrained(folder,
trust_remote_code=True)` in a process that cannot import imagegem_hf (its code is saved beside the weights), and
without `trust_remote_code` where imagegem_hf is imported."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
from transformers.dynamic_module_utils import get_imports

from imagegem_hf.artifacts import run_without_imagegem
from imagegem_hf.preference import PreferencePrototypeModel, PreferenceQuery, ReferencePair
from imagegem_hf.preference.tiny_backbones import tiny_idefics2
from imagegem_hf.testing import random_images, tiny_vlm

CODE_FILES = {"configuration_preference_prototype.py", "modeling_preference_prototype.py"}

REMOTE_LOAD = """
import json
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

for name, backbone_class in json.loads({expected!r}).items():
    model = AutoModel.from_pretrained(f"{root}/{{name}}", trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(model.backbone).__name__ == backbone_class, type(model.backbone).__name__
    with torch.no_grad():
        logits = model(**load_file(f"{root}/{{name}}_inputs.safetensors")).logits
    save_file({{"logits": logits}}, f"{root}/{{name}}_remote_logits.safetensors")
"""


def _model_and_batch(make_backbone):
    backbone, processor = make_backbone(seed=0)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=3, n_ref=1)
    with torch.no_grad():  # prototypes far from their init, so that loading them wrong would show in the logits
        model.prototypes.normal_(std=1.0, generator=torch.Generator().manual_seed(1))
    ims = random_images(6, size=16, seed=2)
    queries = [
        PreferenceQuery([ReferencePair(ims[0], ims[1], "a red car")], ims[2], "a blue car"),
        PreferenceQuery([ReferencePair(ims[3], ims[4], "a cat")], ims[5], "a dog at dusk"),
    ]
    batch = {k: v for k, v in builder(queries).items() if isinstance(v, torch.Tensor)}
    return model.eval(), batch


def test_preference_model_loads_with_trust_remote_code_without_imagegem(tmp_path):
    backbones = {"llava": (tiny_vlm, "LlavaForConditionalGeneration")}
    backbones["idefics2"] = (tiny_idefics2, "Idefics2ForConditionalGeneration")
    expected = {}
    for name, (make_backbone, _) in backbones.items():
        model, batch = _model_and_batch(make_backbone)
        model.save_pretrained(tmp_path / name)
        save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / f"{name}_inputs.safetensors")
        with torch.no_grad():
            expected[name] = model(**batch).logits
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["auto_map"] == {
            "AutoConfig": "configuration_preference_prototype.PreferencePrototypeConfig",
            "AutoModel": "modeling_preference_prototype.PreferencePrototypeModel",
        }
        assert CODE_FILES <= {p.name for p in (tmp_path / name).iterdir()}
        for code in CODE_FILES:  # what transformers requires of the saved code: the libraries, not imagegem_hf
            assert "imagegem_hf" not in get_imports(tmp_path / name / code)

        # with imagegem_hf imported no remote code is needed, and the library's own class is used
        local = AutoModel.from_pretrained(tmp_path / name).eval()
        assert type(local) is PreferencePrototypeModel

    classes = json.dumps({name: backbone_class for name, (_, backbone_class) in backbones.items()})
    result = run_without_imagegem(REMOTE_LOAD.format(expected=classes, root=str(tmp_path)))
    assert result.ok, result.output
    for name, logits in expected.items():
        remote = load_file(tmp_path / f"{name}_remote_logits.safetensors")["logits"]
        torch.testing.assert_close(remote, logits, atol=0, rtol=0)
