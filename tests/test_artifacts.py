"""The demo's artifact table: each folder is loaded with its plain Hugging Face call in a fresh process without
imagegem_hf, and a folder that does not load (or does not exist) is reported as FAIL with the error's last line."""

from __future__ import annotations

import json

import numpy as np

from imagegem_hf.artifacts import Artifact, artifact_table, check_artifacts, demo_artifacts, run_without_imagegem
from imagegem_hf.w2w import WeightSpace

LOAD = "AutoModel.from_pretrained({folder}, trust_remote_code=True)"
PROJECT = """
import numpy as np
from diffusers import AutoModel
space = AutoModel.from_pretrained(folder, trust_remote_code=True)
np.save(folder + "/projection.npy", space.project(np.arange(8, dtype=np.float32)))
"""


def test_artifact_table_loads_each_folder_in_a_fresh_process(tmp_path):
    space = WeightSpace(module_names=["unet.a", "unet.b"], module_shapes=[[2, 2], [1, 3]], n_components=2)
    space.mean.copy_(space.mean + 1.0)
    space.components.copy_(space.components.new_tensor(np.arange(16, dtype=np.float32).reshape(2, 8)))
    space.save_pretrained(tmp_path / "space")
    space.save_pretrained(tmp_path / "broken")  # the control: its config no longer says where the code is
    config = json.loads((tmp_path / "broken" / "config.json").read_text())
    del config["auto_map"]
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    artifacts = [
        Artifact("space", tmp_path / "space", LOAD, check=PROJECT),
        Artifact(
            "broken space",
            tmp_path / "broken",
            "json.load(open({folder} + '/config.json'))['auto_map']",
            "import json",
        ),
        Artifact("never saved", tmp_path / "missing", LOAD, imports="from diffusers import AutoModel"),
    ]
    checks = check_artifacts(artifacts, show_progress=False)
    assert [check.result.ok for check in checks] == [True, False, False]
    # ((θ − μ) / σ) · Vᵀ with μ = 1, σ = 1, written out
    expected = (np.arange(8, dtype=np.float32) - 1.0) @ np.arange(16, dtype=np.float32).reshape(2, 8).T
    np.testing.assert_allclose(np.load(tmp_path / "space" / "projection.npy"), expected)
    assert checks[1].result.error == "KeyError: 'auto_map'"

    lines = artifact_table(checks).splitlines()
    assert lines[0] == "| artifact | folder | how to load it | card | loaded in a fresh process |"
    folder = tmp_path / "space"
    load = f"AutoModel.from_pretrained('{folder}', trust_remote_code=True)"
    assert lines[2] == f"| space | {folder} | `{load}` | README.md | OK |"
    assert lines[3].startswith("| broken space |") and "| FAIL: " in lines[3]
    assert lines[4].endswith(f"| missing | FAIL: {tmp_path / 'missing'} does not exist |")


def test_demo_artifacts_cover_every_kind(tmp_path):
    names = [artifact.name for artifact in demo_artifacts(tmp_path)]
    assert names == [
        "dataset",
        "recommender (SASRec)",
        "VLM ranker",
        "DPO LoRA",
        "W2W weight space",
        "W2W edit pipeline",
        "preference model",
    ]
    assert [artifact.name for artifact in demo_artifacts(tmp_path, stages=["data", "w2w"])] == [
        "dataset",
        "W2W weight space",
        "W2W edit pipeline",
    ]
    assert all(str(artifact.folder).startswith(str(tmp_path)) for artifact in demo_artifacts(tmp_path))


def test_fresh_process_cannot_import_imagegem():
    result = run_without_imagegem("import imagegem_hf")
    assert not result.ok and result.error == "ModuleNotFoundError: No module named 'imagegem_hf'"
