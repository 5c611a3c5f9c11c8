"""The card templates live in the repository's top-level `model_cards/` and ship inside the wheel."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import imagegem_hf.hub

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = sorted(p.name for p in (REPO / "model_cards").glob("*.md"))

RENDER = """
import json, sys
import imagegem_hf
from imagegem_hf.hub import MODEL_CARDS_DIR, render_card
card = render_card("recommender_card.md", model_name="ItemKNN", config={"k": 10}, metrics={}, n_users=3, n_items=4)
json.dump({"package": imagegem_hf.__file__, "cards_dir": str(MODEL_CARDS_DIR),
           "templates": sorted(p.name for p in MODEL_CARDS_DIR.glob("*.md")), "card": card}, sys.stdout)
"""


def test_templates_live_at_the_top_level():
    assert {"dataset_card.md", "dpo_lora_card.md", "preference_card.md", "recommender_card.md"} <= set(TEMPLATES)
    assert not (REPO / "imagegem_hf" / "model_cards").exists()  # one copy, the top-level one
    assert imagegem_hf.hub.MODEL_CARDS_DIR.resolve() == REPO / "model_cards"  # a source checkout reads it directly


def test_installed_wheel_renders_cards(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", "__pycache__", "build", "dist", "*.egg-info", ".venv", "demo_output")
    shutil.copytree(REPO, source, ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = dict(env=env, check=True, capture_output=True, text=True)
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), "."],
        cwd=source,
        **run,
    )
    wheel = next((tmp_path / "dist").glob("imagegem_hf-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **run)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], **run)
    # The dependencies come from this interpreter's site-packages, added after the venv's own (which holds the wheel).
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], **run
        ).stdout.strip()
    )
    (purelib / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    out = subprocess.run([str(python), "-c", RENDER], cwd=tmp_path, **run)
    result = json.loads(out.stdout)
    assert Path(result["package"]).is_relative_to(purelib)
    assert Path(result["cards_dir"]) == purelib / "imagegem_hf" / "model_cards"
    assert result["templates"] == TEMPLATES
    assert result["card"].startswith("---\n") and "# ItemKNN recommender" in result["card"]
