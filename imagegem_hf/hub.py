"""Hub plumbing shared by every artifact: resolve a path or repo id, render cards, push folders.

Every artifact imagegem_hf produces is a directory laid out exactly like its Hub repo. The same call
loads it from a local folder or from a repo id (downloaded with `huggingface_hub.snapshot_download`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jinja2


def _model_cards_dir() -> Path:
    """The card templates: `imagegem_hf/model_cards/` in an installed package (the build copies them there), the
    repository's top-level `model_cards/` in a source checkout or an editable install."""
    installed = Path(__file__).parent / "model_cards"
    return installed if installed.is_dir() else Path(__file__).parent.parent / "model_cards"


MODEL_CARDS_DIR = _model_cards_dir()
PLACEHOLDER_REPO = "<this repo or folder>"
"""What the cards' usage snippets load: replace it with the repo id (or the local folder) of the artifact."""
logger = logging.getLogger(__name__)


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
    """Render a model or dataset card from the template `model_cards/<template_name>` (see `MODEL_CARDS_DIR`).

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


_CACHE_SNAPSHOT = re.compile(r"(?:models|datasets)--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+(?:/.*)?")
_SIZE_CATEGORIES = tuple(  # (exclusive upper bound, category) as the Hub spells them
    zip(
        (10**3, 10**4, 10**5, 10**6, 10**7, 10**8, 10**9, 10**10, 10**11, 10**12),
        ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B", "1B<n<10B")
        + ("10B<n<100B", "100B<n<1T"),
        strict=True,
    )
)


def hub_repo_id(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub repo id an artifact was loaded from, for a card's `base_model`; None when there is none.

    A repo id (`"org/name"`) is returned as is, and so is one read from a Hub cache snapshot path
    (`.../models--org--name/snapshots/<revision>/...`, what `from_pretrained` of a repo id leaves in the components'
    configs). An existing local folder, an empty value or None gives None: the Hub accepts only repo ids there.

    Example:
        ```python
        >>> from imagegem_hf.hub import hub_repo_id
        >>> hub_repo_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
        'stable-diffusion-v1-5/stable-diffusion-v1-5'
        >>> hub_repo_id("/root/.cache/huggingface/hub/models--org--name/snapshots/abc123/unet")
        'org/name'
        ```
    """
    if not name_or_path:
        return None
    text = Path(name_or_path).as_posix()
    match = _CACHE_SNAPSHOT.search(text)
    if match:
        return f"{match['org']}/{match['name']}"
    if Path(name_or_path).expanduser().exists() or str(name_or_path).startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def base_model_license(name_or_path: str | os.PathLike | None, repo_type: str = "model") -> str | None:
    """The `license` of a base model's (or source dataset's) card, read offline from a local folder or the Hub
    cache; None if unknown.

    Artifacts trained from a base model (a LoRA, a fine-tuned backbone) are under the base's license, which their
    own cards repeat.

    Example:
        ```python
        >>> from imagegem_hf.hub import base_model_license
        >>> base_model_license("stable-diffusion-v1-5/stable-diffusion-v1-5")  # doctest: +SKIP
        'creativeml-openrail-m'
        ```
    """
    if not name_or_path:
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    card: str | os.PathLike | None = None
    local = Path(name_or_path).expanduser()
    if (local / "README.md").is_file():
        card = local / "README.md"
    elif (local.parent / "model_index.json").is_file() and (local.parent / "README.md").is_file():
        card = local.parent / "README.md"  # a pipeline component's card is its pipeline's
    repo_id = hub_repo_id(name_or_path)
    if card is None and repo_id is not None:
        cached = try_to_load_from_cache(repo_id, "README.md", repo_type=repo_type)
        card = cached if isinstance(cached, str) else None
    if card is None:
        return None
    license_ = (metadata_load(card) or {}).get("license")
    return license_ if isinstance(license_, str) else None


def card_license(base_model: str | os.PathLike | None, repo_type: str = "model") -> dict[str, str]:
    """The license fields of a card for an artifact derived from `base_model` (the `_license.md` template's input).

    The base's own license when its card states one (see `base_model_license`); otherwise `license: other`, named
    `base-model-license` (`source-dataset-license` for `repo_type="dataset"`), with a link to the base's Hub page
    when the base is a repo.

    Example:
        ```python
        >>> from imagegem_hf.hub import card_license
        >>> card_license("/no/such/base")
        {'license': 'other', 'license_name': 'base-model-license'}
        ```
    """
    license_ = base_model_license(base_model, repo_type)
    if license_ is not None:
        return {"license": license_}
    dataset = repo_type == "dataset"
    fields = {"license": "other", "license_name": "source-dataset-license" if dataset else "base-model-license"}
    repo_id = hub_repo_id(base_model)
    if repo_id is not None:
        fields["license_link"] = f"https://huggingface.co/{'datasets/' if dataset else ''}{repo_id}"
    return fields


def size_category(n_rows: int) -> str:
    """The Hub's `size_categories` value for a dataset of `n_rows` rows.

    Example:
        ```python
        >>> from imagegem_hf.hub import size_category
        >>> size_category(999), size_category(25_000)
        ('n<1K', '10K<n<100K')
        ```
    """
    for limit, category in _SIZE_CATEGORIES:
        if n_rows < limit:
            return category
    return "n>1T"


MARKER_NAME = ".imagegem_hf"
"""The file `atomic_directory` puts in every folder it writes: `overwrite=True` replaces only folders that hold it."""
_MARKER_TEXT = "Written by imagegem_hf. `--overwrite` (overwrite=True) may replace this whole folder.\n"
_HOST = socket.gethostname()


@contextmanager
def atomic_directory(
    final_dir: str | os.PathLike, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final_dir` only if the block finishes without error.

    A failure inside the block leaves `final_dir` untouched and removes the temporary directory, so a
    failed write never leaves a half-written artifact behind. The folder gets the marker file `MARKER_NAME`,
    and `overwrite=True` replaces only a folder that holds it (one this function wrote): any other non-empty
    folder is refused, so a mistyped output path cannot delete the user's files.

    The temporary folder is `.<name>.tmp-<host>-<pid>-<random>` next to `final_dir`, created with the umask's
    permissions. Replacing renames the old folder to `.<name>.old-<host>-<pid>`, renames the new one into place
    and deletes the old one. Every call first cleans up after processes of this host that died mid-write:
    their temporary folders are deleted, and an old folder whose replacement never arrived (a kill between the
    two renames) is renamed back to `final_dir`.

    Args:
        final_dir: Where the finished directory should end up.
        overwrite: Replace an existing `final_dir` written by imagegem_hf. If False and `final_dir` exists and
            is not empty, `FileExistsError` is raised up front.
        inputs: Files or folders the block reads: `final_dir` must not be, contain or lie inside any of them.

    Raises:
        FileExistsError: `final_dir` is not empty and `overwrite` is False, or it is not a folder written by
            imagegem_hf, or it is a file or a symbolic link.
        ValueError: `final_dir` is, contains or lies inside one of `inputs`.

    Example:
        ```python
        >>> from imagegem_hf.hub import atomic_directory
        >>> with atomic_directory("out/model", overwrite=True) as tmp:  # doctest: +SKIP
        ...     (tmp / "config.json").write_text("{}")
        ```
    """
    final_dir = Path(final_dir)
    _refuse_overlap(final_dir, inputs)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final_dir)
    _check_replaceable(final_dir, overwrite)
    tmp = _new_sibling(final_dir, "tmp")
    try:
        yield tmp
        (tmp / MARKER_NAME).write_text(_MARKER_TEXT, encoding="utf-8")
        _check_replaceable(final_dir, overwrite)  # again: the block may have run for hours
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_dir.is_dir() and not any(final_dir.iterdir()):
        final_dir.rmdir()
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{_HOST}-{os.getpid()}")
        final_dir.rename(old)
        tmp.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final_dir)


def recover_directory(final_dir: str | os.PathLike) -> dict[str, int]:
    """Clean up after processes of this host that died while `atomic_directory` wrote `final_dir`.

    Their temporary folders `.<name>.tmp-<host>-<pid>-*` are deleted; an old copy `.<name>.old-<host>-<pid>` is
    renamed back to `final_dir` when `final_dir` is missing (the process died between the two renames of a
    replacement) and deleted otherwise. Folders of live processes and of other hosts are left alone.
    `atomic_directory` calls this first; call it yourself to restore a folder without writing a new one.

    Returns:
        `{"removed": n, "restored": 0 or 1}`.
    """
    final_dir = Path(final_dir)
    name = re.escape(final_dir.name)
    temp_pattern = re.compile(rf"\.{name}\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+")
    old_pattern = re.compile(rf"\.{name}\.old-(?:(?P<host>.+)-)?(?P<pid>\d+)")  # `.old-<pid>`: older releases
    counts = {"removed": 0, "restored": 0}
    if not final_dir.parent.is_dir():
        return counts
    for sibling in sorted(final_dir.parent.iterdir()):
        match = temp_pattern.fullmatch(sibling.name) or old_pattern.fullmatch(sibling.name)
        if match is None or (match["host"] or _HOST) != _HOST or _process_alive(int(match["pid"])):
            continue
        if match.re is old_pattern and not final_dir.exists() and not final_dir.is_symlink():
            sibling.rename(final_dir)
            counts["restored"] += 1
            logger.warning(
                "Restored %s from %s, left by process %s that died mid-replace.", final_dir, sibling.name, match["pid"]
            )
        else:
            shutil.rmtree(sibling, ignore_errors=True)
            counts["removed"] += 1
    if counts["removed"]:
        logger.info("Removed %d folder(s) left next to %s by processes that died.", counts["removed"], final_dir)
    return counts


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate the process there: never treat a folder as stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _new_sibling(final_dir: Path, kind: str) -> Path:
    """Create `.<name>.<kind>-<host>-<pid>-<random>` next to `final_dir` with the umask's permissions."""
    while True:
        path = final_dir.with_name(f".{final_dir.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def _check_replaceable(final_dir: Path, overwrite: bool) -> None:
    if final_dir.is_symlink() or (final_dir.exists() and not final_dir.is_dir()):
        raise FileExistsError(f"{final_dir} exists and is not a folder (a file or a link); choose another path.")
    if not final_dir.exists() or not any(final_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{final_dir} already exists; pass --overwrite (overwrite=True in Python) to replace it."
        )
    if not (final_dir / MARKER_NAME).is_file():
        raise FileExistsError(
            f"{final_dir} is not empty and has no {MARKER_NAME} marker, the file imagegem_hf leaves in every folder "
            "it writes, so --overwrite (overwrite=True) does not replace it: choose a new or empty folder, or empty "
            "it yourself (once for a folder written by a release older than the marker)."
        )


def _refuse_overlap(final_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    output = final_dir.resolve()
    for source in inputs:
        path = Path(source).resolve()
        if output == path:
            relation = "is"
        elif path in output.parents:
            relation = "lies inside"
        elif output in path.parents:
            relation = "contains"
        else:
            continue
        raise ValueError(f"The output {final_dir} {relation} the input {source}: choose an output folder outside it.")


def refresh_dataset_info(dataset_dir: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every data file of each config listed in a dataset card's `configs:`.

    `datasets` 5.2 keys the cache of a local folder whose card lists `configs:` on the folder's name and the file
    patterns only, so `load_dataset` on a rebuilt folder (or on another folder of the same name) returns the rows
    of the first one it cached. The card's `dataset_info` is part of that key: with each config's
    `download_checksums` in it, changed files give a new key and `load_dataset` reads them.

    Args:
        dataset_dir: A folder with a `README.md` whose YAML lists `configs:` with `data_files` patterns.

    Example:
        ```python
        >>> from imagegem_hf.hub import refresh_dataset_info
        >>> refresh_dataset_info("demo_output/dataset")  # doctest: +SKIP
        ```
    """
    import hashlib

    from huggingface_hub.repocard import metadata_load, metadata_save

    folder = Path(dataset_dir)
    card = folder / "README.md"
    metadata = metadata_load(card) or {}
    infos = []
    for config in metadata.get("configs", []):
        checksums: dict[str, dict[str, Any]] = {}
        for data_files in config.get("data_files", []):
            pattern = data_files["path"] if isinstance(data_files, Mapping) else data_files
            for path in sorted(folder.glob(pattern)):
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda handle=handle: handle.read(1 << 24), b""):
                        digest.update(block)
                relative = path.relative_to(folder).as_posix()
                checksums[relative] = {"num_bytes": path.stat().st_size, "checksum": digest.hexdigest()}
        infos.append(
            {
                "config_name": config["config_name"],
                "download_size": sum(c["num_bytes"] for c in checksums.values()),
                "download_checksums": checksums,
            }
        )
    if infos:
        metadata["dataset_info"] = infos
    else:
        metadata.pop("dataset_info", None)
    metadata_save(card, metadata)


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
            ignore_patterns=[MARKER_NAME],
        )
    except OSError as err:  # requests' ConnectionError is an OSError
        raise HubUnavailableError(f"Cannot push to {repo_id!r}: the Hugging Face Hub is unreachable ({err}).") from err
    return str(getattr(info, "commit_url", info))
