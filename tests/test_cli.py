import importlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from imagegem_hf.cli import COMMANDS, build_parser, main, top_level_parser

HEAVY = ("torch", "transformers", "diffusers")


def test_dataset_cli_end_to_end(tmp_path, capsys):
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    assert main(["dataset", "synth", str(raw), "--users", "30", "--seed", "1"]) == 0
    assert main(["dataset", "build", str(raw), str(ds)]) == 0
    assert "| images |" in capsys.readouterr().out
    assert main(["dataset", "subsets", str(ds), str(tmp_path / "subsets")]) == 0
    assert len(pd.read_parquet(tmp_path / "subsets" / "models.parquet")) > 0
    assert main(["dataset", "stats", str(ds), "--out", str(tmp_path / "stats")]) == 0
    assert (tmp_path / "stats" / "base_models.png").exists()
    # A second build into the same folder is refused with one clear line.
    assert main(["dataset", "build", str(raw), str(ds)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_build_overwrite_never_deletes_inputs_or_foreign_folders(tmp_path, capsys):
    project, raw = tmp_path / "proj", tmp_path / "proj" / "raw"
    assert main(["dataset", "synth", str(raw), "--users", "5", "--seed", "1"]) == 0
    (project / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in project.rglob("*"))
    # The output contains the input, equals it, or lies inside it: refused, whatever --overwrite says.
    for output in (project, raw, raw / "ds"):
        assert main(["dataset", "build", str(raw), str(output), "--overwrite"]) == 2
        assert "input" in capsys.readouterr().err
    # A non-empty folder that no build wrote: refused, naming the flag.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    assert main(["dataset", "build", str(raw), str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["dataset", "build", str(raw), str(other), "--overwrite"]) == 2
    assert "has no .imagegem_hf marker" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in project.rglob("*")) == before
    assert (project / "notes.txt").read_text() == "mine" and [p.name for p in other.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "proj"]  # no temporary folder left
    # A folder an earlier build wrote is replaced.
    assert main(["dataset", "build", str(raw), str(tmp_path / "ds")]) == 0
    assert main(["dataset", "build", str(raw), str(tmp_path / "ds"), "--overwrite"]) == 0


_RUN_CLI = """
import runpy, sys
sys.argv = ["imagegem", *sys.argv[1:]]
try:
    runpy.run_module("imagegem_hf.cli", run_name="__main__")  # `python -m imagegem_hf.cli ARGS`
except SystemExit:
    pass
print("MODULES", *sorted(sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["dataset", "build", "--help"], ["recommend", "--help"], ["dpo", "eval", "--help"], ["w2w", "-h"]],
)
def test_help_imports_no_heavy_library(argv):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    result = subprocess.run([sys.executable, "-c", _RUN_CLI, *argv], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: imagegem")
    modules = set(result.stdout.rsplit("MODULES", 1)[1].split())
    areas = {module_name for name, module_name, _ in COMMANDS if name in argv}
    assert {module_name for _, module_name, _ in COMMANDS} & modules == areas  # the command's own area only
    assert not {name.split(".")[0] for name in modules} & set(HEAVY)


def test_command_table_matches_what_the_areas_register():
    # The full parser, every area imported: the lazy one's `imagegem --help` must be the same text.
    parser, subparsers = top_level_parser()
    for _, module_name, _ in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    assert build_parser().format_help() == parser.format_help()
    for name, _, _ in COMMANDS:  # and so is the help of the parser that runs a command
        assert build_parser([name]).format_help() == parser.format_help()


def test_a_finished_command_tears_down_the_process_group_and_a_failed_one_leaves_it(tmp_path, capsys):
    # Left to interpreter shutdown, a gloo group can abort the process after its work is done (SIGABRT).
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["dataset", "build", str(tmp_path / "missing"), str(tmp_path / "ds")]) == 2
        assert "error" in capsys.readouterr().err
        assert dist.is_initialized()  # an error leaves it: the other ranks may still be inside a collective
        assert main(["dataset", "synth", str(tmp_path / "raw"), "--users", "5", "--seed", "1"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
