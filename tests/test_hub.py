import json

import pytest

from imagegem_hf.hub import (
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
    with pytest.raises(FileExistsError):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


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
