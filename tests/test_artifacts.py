"""The demo's artifact table: each folder is loaded with its plain Hugging Face call in a fresh process without
imagegem_hf, and a folder that does not load (or does not exist) is reported as FAIL with the error's last line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from imagegem_hf.artifacts import Artifact, artifact_table, check_artifacts, demo_artifacts, run_without_imagegem

LOAD = "safetensors.numpy.load_file({folder} + '/model.safetensors')"
CHECK = """
import numpy as np
from safetensors.numpy import load_file
state = load_file(folder + "/model.safetensors")
np.save(folder + "/loaded.npy", state["weight"] @ state["bias"])
"""


def test_artifact_table_loads_each_folder_in_a_fresh_process(tmp_path):
    weight, bias = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.0, -1.0, 0.5], dtype=np.float32)
    for name in ("model", "broken"):
        (tmp_path / name).mkdir()
        save_file({"weight": weight, "bias": bias}, tmp_path / name / "model.safetensors")
    (tmp_path / "model" / "README.md").write_text("---\nlibrary_name: safetensors\n---\n# model\n")
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "x"}))  # the control: no auto_map
    artifacts = [
        Artifact("model", tmp_path / "model", LOAD, check=CHECK),
        Artifact(
            "broken", tmp_path / "broken", "json.load(open({folder} + '/config.json'))['auto_map']", "import json"
        ),
        Artifact("never saved", tmp_path / "missing", LOAD, imports="import safetensors.numpy"),
    ]
    checks = check_artifacts(artifacts, show_progress=False)
    assert [check.result.ok for check in checks] == [True, False, False]
    np.testing.assert_array_equal(np.load(tmp_path / "model" / "loaded.npy"), [0 - 1 + 1.0, 3 - 4 + 2.5])
    assert checks[1].result.error == "KeyError: 'auto_map'"

    lines = artifact_table(checks).splitlines()
    assert lines[0] == "| artifact | folder | how to load it | card | loaded in a fresh process |"
    model, broken = tmp_path / "model", tmp_path / "broken"
    assert (
        lines[2]
        == f"| model | {model} | `safetensors.numpy.load_file('{model}' + '/model.safetensors')` | README.md | OK |"
    )
    load_broken = f"json.load(open('{broken}' + '/config.json'))['auto_map']"
    assert lines[3] == f"| broken | {broken} | `{load_broken}` | missing | FAIL: KeyError: 'auto_map' |"
    assert lines[4].endswith(f"| missing | FAIL: {tmp_path / 'missing'} does not exist |")


def test_a_folder_given_relative_to_the_working_directory_loads(tmp_path, monkeypatch):
    # `make demo` passes `--output-dir demo_output`; the fresh process runs in a scratch directory of its own
    (tmp_path / "out" / "model").mkdir(parents=True)
    weight, bias = np.ones((2, 3), dtype=np.float32), np.ones(3, dtype=np.float32)
    save_file({"weight": weight, "bias": bias}, tmp_path / "out" / "model" / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    (check,) = check_artifacts([Artifact("model", "out/model", LOAD, check=CHECK)], show_progress=False)
    assert check.result.ok, check.result.error
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "model" / "loaded.npy"), [3.0, 3.0])
    assert "safetensors.numpy.load_file('out/model' + '/model.safetensors')" in artifact_table([check])


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


def test_the_demo_from_a_relative_output_dir_loads_its_dataset_and_fails_on_an_artifact_that_does_not_load(
    tmp_path, monkeypatch, capsys
):
    import imagegem_hf.demo as demo
    from imagegem_hf.cli import main

    monkeypatch.chdir(tmp_path)  # `make demo` writes to demo_output, relative to the clone
    every = demo.demo_artifacts

    def with_a_missing_one(output_dir, stages=None):
        return [*every(output_dir, stages), Artifact("never saved", Path(output_dir) / "missing", LOAD)]

    monkeypatch.setattr(demo, "demo_artifacts", with_a_missing_one)
    assert main(["demo", "--only", "data", "--users", "40"]) == 1
    error = capsys.readouterr().err
    assert "1 of 2 artifacts did not load" in error and "never saved at demo_output/missing" in error
    rows = (tmp_path / "demo_output" / "artifacts.md").read_text().splitlines()
    assert rows[2].startswith("| dataset | demo_output/dataset |") and rows[2].endswith("| OK |")
