"""Every ```python block of the README runs as written, on CPU, offline, with tiny models in place of the Hub's.

The blocks run one after the other in one fresh process (each in its own namespace), from a working folder laid
out with what their relative paths name: `demo_output/dataset` (built from the demo's synthetic sample),
`dpo-pairs/`, `loras/` with `labels.csv`, `mine.safetensors`. The only edits are in `SUBSTITUTIONS`: repo ids of
models too big for a test become local folders of tiny models, and training budgets become a step or two.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def substitutions(work: Path) -> dict[str, str]:
    """README text → what the test runs instead (each must occur in the README, so none goes stale)."""
    return {
        # Hub models → tiny local ones of the same class
        '"HuggingFaceTB/SmolVLM-Instruct"': repr(str(work / "tiny-vlm")),
        '"xswu/HPSv2"': repr(str(work / "tiny-hpsv2")),
        'StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")': (
            f"StableDiffusionPipeline.from_pretrained({str(work / 'tiny-sd')!r})"
        ),
        '"org/sd15-w2w"': repr(str(work / "tiny-w2w")),
        # budgets sized for real runs → one or a few steps
        "default_models()": (
            '{"pop": __import__("imagegem_hf.recsys", fromlist=["Pop"]).Pop(), '
            '"sasrec": __import__("imagegem_hf.recsys", fromlist=["SASRec"]).SASRec(dim=8, max_steps=5, min_steps=0)}'
        ),
        "ks=(10, 50, 100)": "ks=(10,)",  # the sample's catalogue is smaller than 100 LoRAs
        "gradient_accumulation_steps=128,": "gradient_accumulation_steps=1,",
        "max_steps=2000,": "max_steps=1, resolution=32,",
        "n_components=64)": "n_components=4)",
    }


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _lay_out(work: Path) -> None:
    """The folders and files the README's relative paths name, from tiny models and the demo's sample."""
    from imagegem_hf.data.build import build_dataset
    from imagegem_hf.data.synth import generate_raw_sample
    from imagegem_hf.scoring import HPSv2
    from imagegem_hf.testing import tiny_clip_model, tiny_sd_pipeline, tiny_vlm
    from imagegem_hf.w2w import W2WEditPipeline, WeightSpace, lora_target_shapes, save_lora
    from imagegem_hf.w2w.demo import ATTENTION_TARGETS, synthetic_loras
    from tests.dpo.test_dpo import _pairs

    generate_raw_sample(work / "raw", users=40, seed=0, show_progress=False)
    build_dataset(work / "raw", work / "demo_output" / "dataset", show_progress=False)

    vlm, processor = tiny_vlm()
    vlm.save_pretrained(work / "tiny-vlm")
    processor.save_pretrained(work / "tiny-vlm")
    clip, clip_processor = tiny_clip_model()
    HPSv2(clip, clip_processor.tokenizer).save_pretrained(work / "tiny-hpsv2")

    sd = tiny_sd_pipeline(seed=0)
    sd.save_pretrained(work / "tiny-sd")
    _pairs().to_parquet(work / "dpo-pairs" / "train.parquet")

    loras, labels, _ = synthetic_loras(lora_target_shapes(sd.unet, ATTENTION_TARGETS), n=12, seed=2)
    (work / "loras").mkdir()
    for i, lora in enumerate(loras):
        save_lora(lora, work / "loras" / f"user{i}.safetensors")
    save_lora(loras[0], work / "mine.safetensors")
    rows = "".join(f"user{i},{int(label)}\n" for i, label in enumerate(labels))
    (work / "labels.csv").write_text("model,label\n" + rows)
    space = WeightSpace.build(loras, n_components=4, show_progress=False)
    names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    W2WEditPipeline(**{k: sd.components[k] for k in names}, weight_space=space).save_pretrained(work / "tiny-w2w")


def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    work = tmp_path / "work"
    work.mkdir()
    _lay_out(work)
    replaced = {}
    for old, new in substitutions(work).items():
        count = sum(block.count(old) for block in blocks)
        assert count, f"{old!r} is no longer in the README: update SUBSTITUTIONS"
        replaced[old] = new
    snippets = {}
    for i, block in enumerate(blocks):
        for old, new in replaced.items():
            block = block.replace(old, new)
        assert 'device="cuda"' not in block and "bf16=True" not in block, block  # chosen at run time
        snippets[f"block{i}"] = block
    _run(snippets, work, tmp_path)
    for written in ("sasrec-models/README.md", "dpo-sd15-dogs/README.md", "grid.png"):
        assert (work / written).is_file(), written


def _run(snippets: dict[str, str], work: Path, tmp_path: Path) -> None:
    runner = tmp_path / "run.py"
    runner.write_text(
        "import json, os, sys, traceback\n"
        "failed = {}\n"
        "for name, code in json.loads(open(sys.argv[1]).read()).items():\n"
        "    try:\n"
        "        exec(compile(code, name, 'exec'), {'__name__': '__main__'})\n"
        "    except Exception:\n"
        "        failed[name] = code + '\\n' + traceback.format_exc()\n"
        "print(json.dumps(failed))\n"
    )
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    out = subprocess.run(
        [sys.executable, str(runner), str(tmp_path / "snippets.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    if failed:
        pytest.fail("\n".join(f"--- {name}\n{trace[-2500:]}" for name, trace in failed.items()))
