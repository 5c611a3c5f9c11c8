"""Hub plumbing shared by every artifact: resolve a path or repo id, render cards, push folders.

Every artifact imagegem_hf produces is a directory laid out exactly like its Hub repo. The same call
loads it from a local folder or from a repo id (downloaded with `huggingface_hub.snapshot_download`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jinja2

MODEL_CARDS_DIR = Path(__file__).parent / "model_cards"


class HubUnavailableError(RuntimeError):
    """Raised when a repo id must be downloaded but the Hugging Face Hub cannot be reached."""


def resolve(path_or_repo_id: str | os.PathLike, repo_type: str = "model", revision: str | None = None) -> Path:
    """Return a local directory for `path_or_repo_id`.

    A local directory is returned as is. Anything else is treated as a Hub repo id and downloaded with
    `huggingface_hub.snapshot_download` (which honours `HF_HUB_OFFLINE` and the local cache).

    Args:
        path_or_repo_id: A local directory or a Hub repo id such as `"org/name"`.
        repo_type: `"model"` or `"dataset"`.
        revision: Optional branch, tag or commit of the Hub repo.

    Returns:
        The local directory holding the files.

    Raises:
        FileNotFoundError: The argument looks like a local path (starts with `.`, `/` or `~`) but does not exist.
        HubUnavailableError: The repo is not cached and the Hub cannot be reached.

    Example:
        ```python
        >>> from imagegem_hf.hub import resolve
        >>> resolve("demo_output/dataset", repo_type="dataset")  # doctest: +SKIP
        PosixPath('demo_output/dataset')
        ```
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
        raise FileNotFoundError(
            f"{text!r} is not an existing directory (and not a Hub repo id of the form 'org/name')."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, repo_type=repo_type, revision=revision))
    except LocalEntryNotFoundError as err:
        raise HubUnavailableError(
            f"Could not download {repo_type} repo {text!r}: the Hugging Face Hub is unreachable (offline mode or no "
            "network) and the repo is not in the local cache. Pass a local directory instead, or connect and retry."
        ) from err


def render_card(template_name: str, **context: Any) -> str:
    """Render a model or dataset card from `imagegem_hf/model_cards/<template_name>`.

    Args:
        template_name: File name of the Jinja template, e.g. `"dataset_card.md"`.
        **context: Variables for the template.

    Returns:
        The rendered Markdown (with its YAML front matter).

    Example:
        ```python
        >>> from imagegem_hf.hub import render_card
        >>> card = render_card("recommender_card.md", model_name="ItemKNN", metrics={})  # doctest: +SKIP
        ```
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(MODEL_CARDS_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(template_name).render(**context)


@contextmanager
def atomic_directory(final_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final_dir` only if the block finishes without error.

    A failure inside the block leaves `final_dir` untouched and removes the temporary directory, so a
    failed write never leaves a half-written artifact behind.

    Args:
        final_dir: Where the finished directory should end up.
        overwrite: Replace an existing `final_dir`. If False and it exists, `FileExistsError` is raised up front.

    Example:
        ```python
        >>> from imagegem_hf.hub import atomic_directory
        >>> with atomic_directory("out/model", overwrite=True) as tmp:  # doctest: +SKIP
        ...     (tmp / "config.json").write_text("{}")
        ```
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not overwrite:
        raise FileExistsError(f"{final_dir} already exists; pass overwrite=True to replace it.")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        final_dir.rename(trash)
        tmp.rename(final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final_dir)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write `data` as sorted, indented JSON (stable bytes for identical content)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected {path.name} in {path.parent}, but it is missing.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    repo_type: str = "model",
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Create `repo_id` if needed and upload `folder` to it.

    Args:
        folder: A directory laid out like the Hub repo (as written by `save_pretrained` or a dataset build).
        repo_id: Target repo, `"org/name"`.
        repo_type: `"model"` or `"dataset"`.
        private: Create the repo as private.
        commit_message: Commit message on the Hub.
        token: A Hub token; defaults to the logged-in one.

    Returns:
        The URL of the commit.

    Raises:
        HubUnavailableError: The Hub cannot be reached (offline mode or no network).

    Example:
        ```python
        >>> from imagegem_hf.hub import push_folder
        >>> push_folder("demo_output/dataset", "me/imagegem-sample", repo_type="dataset")  # doctest: +SKIP
        ```
    """
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; build or save the artifact first.")
    if HF_HUB_OFFLINE:
        raise HubUnavailableError(f"Cannot push to {repo_id!r}: HF_HUB_OFFLINE is set. Unset it and retry.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type=repo_type,
            commit_message=commit_message or f"Upload {folder.name} with imagegem_hf",
        )
    except OSError as err:  # requests' ConnectionError is an OSError
        raise HubUnavailableError(f"Cannot push to {repo_id!r}: the Hugging Face Hub is unreachable ({err}).") from err
    return str(getattr(info, "commit_url", info))
