import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imagegem_hf.hub import (
    MARKER_NAME,
    HubUnavailableError,
    atomic_directory,
    push_folder,
    read_json,
    render_card,
    resolve,
    write_json,
)


def test_resolve_local_dir(tmp_path):
    assert resolve(tmp_path) == tmp_path


def test_resolve_missing_local_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        resolve(str(tmp_path / "nope"))


def test_resolve_repo_id_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="unreachable"):
        resolve("imagegem-test-org/does-not-exist-anywhere", repo_type="dataset")


def test_push_offline_is_clear(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        push_folder(tmp_path, "me/repo")
    with pytest.raises(FileNotFoundError):
        push_folder(tmp_path / "missing", "me/repo")


def test_atomic_directory_commits_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == [MARKER_NAME, "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_only_folders_it_wrote(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("the user's own file")
    with pytest.raises(FileExistsError, match=r"has no \.imagegem_hf marker.*--overwrite"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("x")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    (tmp_path / "file").write_text("data")
    with pytest.raises(FileExistsError, match="not a folder"):
        with atomic_directory(tmp_path / "file", overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "data"
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    with atomic_directory(tmp_path / "empty") as tmp:
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "empty" / "a.txt").read_text() == "x"


@pytest.mark.parametrize("output", [".", "raw", "raw/inside"])
def test_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path, output):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "page.json").write_text("{}")
    (tmp_path / MARKER_NAME).write_text("")  # even a folder written by imagegem_hf
    with pytest.raises(ValueError, match="input"):
        with atomic_directory(tmp_path / output, overwrite=True, inputs=[raw]):
            pass
    assert (raw / "page.json").read_text() == "{}"


def test_output_folders_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


_KILLED_WRITER = """
import os, pathlib, sys
from imagegem_hf.hub import atomic_directory
target, when = pathlib.Path(sys.argv[1]), sys.argv[2]
renames = []
original = pathlib.Path.rename
def rename(self, other):
    result = original(self, other)
    renames.append(other)
    if when == "between-renames" and len(renames) == 1:
        os._exit(9)  # killed after moving the old folder away, before the new one is in place
    return result
pathlib.Path.rename = rename
with atomic_directory(target, overwrite=True) as tmp:
    (tmp / "new.txt").write_text("new")
    if when == "mid-write":
        os._exit(9)
"""


@pytest.mark.parametrize("when", ["mid-write", "between-renames"])
def test_killed_writer_is_recovered_on_the_next_call(tmp_path, when):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    process = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), when], env=env)
    assert process.wait() == 9
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    assert len(left) == {"mid-write": 1, "between-renames": 2}[when]  # `.out.tmp-*` (and `.out.old-*`)
    assert all(f"-{process.pid}" in name for name in left)  # named with the dead process's PID
    with pytest.raises(RuntimeError):  # the next write (here one that fails) first cleans up and restores
        with atomic_directory(target, overwrite=True):
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "old.txt").read_text() == "old" and not (target / "new.txt").exists()


def test_folders_of_live_processes_are_left_alone(tmp_path):
    import socket

    alive = tmp_path / f".out.tmp-{socket.gethostname()}-{os.getppid()}-0abc"
    other_host = tmp_path / ".out.tmp-some-other-host-1-0abc"
    alive.mkdir()
    other_host.mkdir()
    with atomic_directory(tmp_path / "out"):
        pass
    assert alive.is_dir() and other_host.is_dir()


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_json_round_trip_is_stable(tmp_path):
    write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "c.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert read_json(tmp_path / "c.json") == {"a": [1, 2], "b": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_render_card_missing_variable_fails(tmp_path):
    import jinja2

    with pytest.raises(jinja2.TemplateNotFound):
        render_card("no_such_card.md")


def test_load_dataset_reads_a_rebuilt_folder_not_the_cached_first_build(tmp_path):
    """datasets keys the cache of a folder whose card lists `configs:` on its name and file patterns: without the
    checksums in `dataset_info`, the second build below loaded the first build's rows."""
    from datasets import load_dataset

    from imagegem_hf.data.build import build_dataset
    from imagegem_hf.data.synth import generate_raw_sample

    rows = []
    for seed in (11, 12):
        generate_raw_sample(tmp_path / f"raw{seed}", users=5, seed=seed)
        out = tmp_path / f"build{seed}" / "dataset"  # same folder name, as a rebuild elsewhere would have
        build_dataset(tmp_path / f"raw{seed}", out, show_progress=False)
        loaded = load_dataset(str(out), "images", split="train", cache_dir=str(tmp_path / "cache"))
        expected = pq.read_table(next((out / "images").glob("*.parquet"))).column("imageId").to_pylist()
        assert loaded["imageId"] == expected
        rows.append(len(expected))
    assert rows[0] != rows[1]
