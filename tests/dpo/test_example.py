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
    command += ["--streaming", "--max_train_pairs", "4", "--lora_alpha", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / LORA_WEIGHTS_NAME).is_file() and (out / "README.md").is_file()
    pipe = tiny_sd_pipeline(seed=0)
    load_dpo_weights(pipe, out)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_dpo_eval_cli_prints_table_4_and_saves_the_grid(tmp_path, capsys):
    from imagegem_hf.cli import main
    from imagegem_hf.dpo import DiffusionDPOConfig, DiffusionDPOTrainer
    from imagegem_hf.testing import tiny_clip_model

    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "base")
    args = DiffusionDPOConfig(
        str(tmp_path / "run"),
        resolution=32,
        max_steps=1,
        lora_rank=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args, train_dataset=_pairs(2))
    trainer.train()
    trainer.save_model()
    model, processor = tiny_clip_model(seed=3)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("a dog on a beach\n\na red car\n")
    command = [
        "dpo",
        "eval",
        str(tmp_path / "base"),
        str(tmp_path / "run"),
        "--prompts",
        str(tmp_path / "prompts.txt"),
    ]
    command += ["--seeds", "0,1", "--steps", "2", "--device", "cpu", "--dtype", "float32", "--subset", "dogs"]
    command += ["--output-dir", str(tmp_path / "eval")]
    for name in ("pickscore", "hpsv2", "clip"):
        command += [f"--{name}-model", str(tmp_path / "clip")]
    assert main(command) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Model | Subset | PickScore | HPSv2 | CLIP | PickScore win rate")
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| base", "| base + DPO"]
    assert all(" | dogs | " in line for line in lines[1:])
    assert (tmp_path / "eval" / "dpo_eval_grid.png").is_file()
    scores = (tmp_path / "eval" / "dpo_eval_scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 2 * 2 * 2  # header + 2 models × 2 prompts × 2 seeds
