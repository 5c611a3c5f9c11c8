"""`imagegem w2w build|direction|edit|grid` end to end on synthetic LoRAs of the tiny UNet."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from imagegem_hf.testing import tiny_sd_pipeline
from imagegem_hf.w2w import Direction, WeightSpace, load_lora, lora_target_shapes, save_lora
from imagegem_hf.w2w.cli import register
from imagegem_hf.w2w.demo import ATTENTION_TARGETS, synthetic_loras


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="imagegem")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_build_direction_edit_grid(tmp_path, capsys):
    sd = tiny_sd_pipeline(seed=0)
    sd.save_pretrained(tmp_path / "base")
    loras, labels, planted = synthetic_loras(lora_target_shapes(sd.unet, ATTENTION_TARGETS), n=20, seed=5)
    folder = tmp_path / "loras"
    for i, lora in enumerate(loras):
        save_lora(lora, folder / f"m{i:02d}.safetensors", format="kohya")
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "label"])
        writer.writerows([f"m{i:02d}", int(y)] for i, y in enumerate(labels))

    assert _run(["w2w", "build", str(folder), "--output", str(tmp_path / "space"), "--components", "8"]) == 0
    space = WeightSpace.from_pretrained(tmp_path / "space")
    explained = 100 * space.explained_variance_ratio().sum()
    assert f"8 components explaining {explained:.1f}% of the variance" in capsys.readouterr().out
    assert space.n_components == 8 and space.config.model_ids[0] == "m00"
    assert not space.config.aligned_signs  # ImageGem's per-LoRA sign rule
    # the paper's alternative: value projections only, at the LoRAs' own rank
    values = ["w2w", "build", str(folder), "--output", str(tmp_path / "v"), "--components", "4", "--layers", "attn_v"]
    assert _run([*values, "--rank", "2", "--align-signs"]) == 0
    attn_v = WeightSpace.from_pretrained(tmp_path / "v")
    assert attn_v.config.module_names == [n for n in space.config.module_names if n.endswith(".to_v")]
    assert attn_v.config.rank == 2 and attn_v.config.n_ignored_modules > 0
    assert attn_v.config.aligned_signs and attn_v.sign_reference.abs().sum() > 0

    args = ["w2w", "direction", str(tmp_path / "space"), "--labels", str(tmp_path / "labels.csv")]
    assert _run([*args, "--test-fraction", "0.25", "--output", str(tmp_path / "d.safetensors")]) == 0
    direction = Direction.load(tmp_path / "d.safetensors")
    assert float(direction.vector @ planted) > 0.9

    out = tmp_path / "edited.safetensors"
    lora_path = str(folder / "m00.safetensors")
    edit = ["w2w", "edit", str(tmp_path / "space"), lora_path, "--direction", str(tmp_path / "d.safetensors")]
    assert _run([*edit, "--strength", "1.5", "--format", "kohya", "--output", str(out)]) == 0
    expected = space.edit(lora_path, direction, 1.5)
    edited = load_lora(out)
    for name, module in expected.modules.items():
        torch.testing.assert_close(edited.modules[name].delta_weight(), module.delta_weight())
    with pytest.raises(ValueError, match="--strength"):
        _run([*edit, "--strength", "1", "--strength", "2", "--output", str(out)])

    grid = tmp_path / "grid" / "g.png"
    argv = [
        "w2w",
        "grid",
        "--base-model",
        str(tmp_path / "base"),
        "--space",
        str(tmp_path / "space"),
        "--lora",
        lora_path,
        "--direction",
        str(tmp_path / "d.safetensors"),
        "--strengths=-1,0,2",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--output",
        str(grid),
    ]
    assert _run(argv) == 0
    assert grid.is_file() and (tmp_path / "grid" / "g_alpha-1.png").is_file()
    assert np.asarray(Image.open(grid)).shape[1] == 96
