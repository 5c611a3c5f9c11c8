import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard

from imagegem_hf.preference.cli import register
from imagegem_hf.preference.data import load_preference_dataset

ROOT = Path(__file__).resolve().parents[2]


def run(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_build_writes_a_loadable_dataset(tmp_path, capsys):
    out = tmp_path / "users"
    argv = ["preference", "build", "--synthetic-users", "12", "--output-dir", str(out), "--n-ref", "3"]
    assert run(argv + ["--val-users", "1", "--test-users", "2", "--seen-users", "2"]) == 0
    splits, images = load_preference_dataset(out)
    assert set(splits) == {"train", "validation", "test_seen", "test_unseen"}
    assert all(len(e.references) == 3 for e in splits["train"]) and images
    assert "test_unseen:" in capsys.readouterr().out
    assert DatasetCard.load(out / "README.md").data.license == "apache-2.0"  # synthetic: generated here
    with pytest.raises(FileExistsError):
        run(argv + ["--val-users", "1", "--test-users", "2", "--seen-users", "2"])


def test_records_file_with_image_bytes(tmp_path):
    import io

    import pandas as pd

    from imagegem_hf.preference.data import synthetic_pickapic_records

    records, images = synthetic_pickapic_records(n_users=6, pairs_per_user=12, seed=3)

    def png(key):
        buffer = io.BytesIO()
        images[key].save(buffer, format="PNG")
        return buffer.getvalue()

    frame = pd.DataFrame(records)
    frame["jpg_0"], frame["jpg_1"] = frame["image_0"].map(png), frame["image_1"].map(png)
    frame.to_parquet(tmp_path / "records.parquet")
    out = tmp_path / "users"
    argv = ["preference", "build", "--records", str(tmp_path / "records.parquet"), "--output-dir", str(out)]
    assert run(argv + ["--image-bytes-columns", "jpg_0,jpg_1", "--val-users", "1", "--test-users", "1"]) == 0
    splits, loaded = load_preference_dataset(out)
    used = {k for e in splits["train"] for k in (e.image0, e.image1)}
    assert used <= set(loaded) and loaded["u0-p0-a"].tobytes() == images["u0-p0-a"].tobytes()


def test_dataset_script_and_example_help(tmp_path):
    script = ROOT / "dataset_scripts" / "build_pickapic_users.py"
    done = subprocess.run(
        [sys.executable, str(script), "--synthetic-users", "8", "--output-dir", str(tmp_path / "d")]
        + ["--val-users", "1", "--test-users", "1", "--seen-users", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "dataset →" in done.stdout
    example = ROOT / "examples" / "train_preference_prototype.py"
    shown = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, check=True)
    assert "--num_prototypes" in shown.stdout and "--model_name_or_path" in shown.stdout


def test_train_validates_and_stage2_loads_the_backbone_in_the_given_dtype(tmp_path):
    from safetensors import safe_open

    from imagegem_hf.testing import tiny_vlm

    data, vlm = tmp_path / "users", tmp_path / "vlm"
    build = ["preference", "build", "--synthetic-users", "8", "--output-dir", str(data), "--n-ref", "1"]
    assert run(build + ["--val-users", "1", "--test-users", "1", "--seen-users", "1"]) == 0
    backbone, processor = tiny_vlm(seed=0)
    backbone.save_pretrained(vlm)
    processor.save_pretrained(vlm)
    common = ["--dataset", str(data), "--max-steps", "2", "--eval-steps", "1", "--n-ref", "1", "--batch-size", "4"]
    stage1 = tmp_path / "s1"
    assert run(["preference", "train", "--model", str(vlm), "--output-dir", str(stage1)] + common) == 0
    card = (stage1 / "model" / "README.md").read_text()
    assert "eval_loss" in card and "eval_pairwise_accuracy" in card  # the validation users were scored
    stage2 = tmp_path / "s2"
    argv = ["preference", "train", "--model", str(stage1 / "model"), "--stage", "2", "--output-dir", str(stage2)]
    assert run(argv + ["--model-dtype", "bfloat16", "--num-prototypes", "2"] + common) == 0
    with safe_open(stage2 / "model" / "model.safetensors", "pt") as weights:
        dtypes = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes.pop("prototypes") == "F32" and set(dtypes.values()) == {"BF16"}
    assert f"(`{vlm}`)" in (stage2 / "model" / "README.md").read_text()  # stage 2's card still names the backbone


def test_train_asking_for_validation_without_validation_users_says_what_to_do(tmp_path):
    data = tmp_path / "users"
    build = ["preference", "build", "--synthetic-users", "6", "--output-dir", str(data), "--n-ref", "1"]
    assert run(build + ["--val-users", "0", "--test-users", "1", "--seen-users", "1"]) == 0
    argv = ["preference", "train", "--dataset", str(data), "--model", "unused", "--output-dir", str(tmp_path / "s1")]
    with pytest.raises(ValueError, match="no validation examples.*--eval-steps 0"):
        run(argv)
