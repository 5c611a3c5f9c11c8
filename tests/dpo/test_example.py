"""examples/train_diffusion_dpo.py end to end on a tiny pipeline and pair dataset saved like their Hub repos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imagegem_hf.dpo.trainer import LORA_WEIGHTS_NAME, load_dpo_weights
from imagegem_hf.testing import tiny_sd_pipeline

from .test_dpo import _pairs

ROOT = Path(__file__).resolve().parents[2]


def test_example_trains_and_saves_a_loadable_lora(tmp_path):
    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "base")
    (tmp_path / "pairs").mkdir()
    _pairs(4).to_parquet(str(tmp_path / "pairs" / "train-00000-of-00001.parquet"))
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "examples" / "train_diffusion_dpo.py")]
    command += ["--pretrained_model", str(tmp_path / "base"), "--dataset", str(tmp_path / "pairs")]
    command += ["--output_dir", str(out), "--resolution", "32", "--max_steps", "2", "--lora_rank", "2"]
    command += ["--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--save_strategy", "no"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / LORA_WEIGHTS_NAME).is_file() and (out / "README.md").is_file()
    pipe = tiny_sd_pipeline(seed=0)
    load_dpo_weights(pipe, out)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
