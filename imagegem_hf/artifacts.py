"""Check that saved artifacts load with the plain Hugging Face libraries, in a fresh process without imagegem_hf.

Every artifact imagegem_hf writes is a Hub-shaped folder that its users load with `load_dataset`,
`AutoModel.from_pretrained`, `DiffusionPipeline.from_pretrained` and the like. `run_without_imagegem` runs a snippet
in a new interpreter whose `sys.path` holds the environment's site-packages but not imagegem_hf (site customisation,
and so the editable install's import hook, is skipped); `check_artifacts` runs one such process per artifact and
`artifact_table` prints what the demo's summary ends with: artifact · folder · how to load it · card · loaded OK.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

# first lines of every snippet: the libraries on sys.path; a copy of imagegem_hf installed into site-packages itself
# (not an editable install, whose import hook `-S` already skips) is made unimportable
_PRELUDE = """\
import importlib.util
import sys

sys.path[:0] = {paths!r}
if importlib.util.find_spec("imagegem_hf") is not None:
    sys.modules["imagegem_hf"] = None
"""


@dataclass
class FreshProcessResult:
    """Outcome of `run_without_imagegem`.

    Attributes:
        ok: The snippet exited with status 0 within the timeout.
        output: Its stdout and stderr together.
        error: The last non-empty line of the output when it failed (the exception), `""` otherwise.
    """

    ok: bool
    output: str
    error: str


def library_paths() -> list[str]:
    """The site-packages folders of this environment (where transformers, diffusers, datasets ... live)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return list(dict.fromkeys(path for path in paths if os.path.isdir(path)))


def run_without_imagegem(code: str, timeout: float = 180.0, env: dict[str, str] | None = None) -> FreshProcessResult:
    """Run Python `code` in a new interpreter that has the installed libraries but cannot import imagegem_hf.

    The interpreter runs with `-S -E` (no `site` module, so no `.pth` import hooks such as an editable install's,
    and no `PYTHONPATH`) in an empty working directory, with this environment's site-packages on `sys.path`, the
    Hub offline and a private `HF_MODULES_CACHE` (where transformers and diffusers copy remote code). A copy of
    imagegem_hf installed into site-packages itself is made unimportable (`sys.modules["imagegem_hf"] = None`).

    Args:
        code: The snippet (dedented before it runs).
        timeout: Seconds before the process is killed (then `ok` is False).
        env: Extra environment variables.

    Returns:
        `FreshProcessResult`.

    Example:
        ```python
        >>> from imagegem_hf.artifacts import run_without_imagegem
        >>> run_without_imagegem("import imagegem_hf").error
        "ModuleNotFoundError: No module named 'imagegem_hf'"
        ```
    """
    script = _PRELUDE.format(paths=library_paths()) + textwrap.dedent(code)
    with tempfile.TemporaryDirectory(prefix="fresh_process_") as scratch:
        child_env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(scratch) / "modules")}
        child_env |= env or {}
        try:
            done = subprocess.run(
                [sys.executable, "-S", "-E", "-c", script],
                cwd=scratch,
                env=child_env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as expired:
            output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
            return FreshProcessResult(False, output, f"timed out after {timeout:g} s")
    output = done.stdout + done.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    error = "" if done.returncode == 0 else (lines[-1] if lines else f"exit status {done.returncode}")
    return FreshProcessResult(done.returncode == 0, output, error)


@dataclass
class Artifact:
    """A saved artifact, the one-line plain Hugging Face call that loads it, and a snippet that checks the load.

    Attributes:
        name: What it is (`"dataset"`, `"DPO LoRA"`, ...).
        folder: Its Hub-shaped folder.
        load: The one-line call a user runs, with `{folder}` standing for the folder (or repo id).
        imports: The import line(s) `load` needs.
        check: A snippet run by `run_without_imagegem` with `folder` defined; it must raise if the load is wrong.
            Defaults to `imports` then `load`.
    """

    name: str
    folder: Path
    load: str
    imports: str = ""
    check: str | None = None

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)

    def load_call(self) -> str:
        """The load call with the folder filled in."""
        return self.load.format(folder=repr(str(self.folder)))

    def check_code(self) -> str:
        """The snippet that checks the load, with `folder` defined as an absolute path (the fresh process runs in
        an empty scratch directory, so a folder given relative to this one would not be found there)."""
        body = self.check if self.check is not None else f"{self.imports}\n{self.load.format(folder='folder')}"
        return f"folder = {str(self.folder.resolve())!r}\n" + textwrap.dedent(body)


@dataclass
class ArtifactCheck:
    """An `Artifact` and the outcome of loading it in a fresh process."""

    artifact: Artifact
    result: FreshProcessResult


class ArtifactLoadError(RuntimeError):
    """Raised when saved artifacts do not load in a fresh process; `checks` holds every outcome."""

    def __init__(self, checks: Sequence[ArtifactCheck]) -> None:
        self.checks = list(checks)
        failed = [check for check in self.checks if not check.result.ok]
        super().__init__(
            f"{len(failed)} of {len(self.checks)} artifacts did not load in a fresh process without imagegem_hf: "
            + "; ".join(f"{check.artifact.name} at {check.artifact.folder} ({check.result.error})" for check in failed)
        )


def check_artifacts(
    artifacts: Sequence[Artifact], timeout: float = 180.0, show_progress: bool = True
) -> list[ArtifactCheck]:
    """Load each artifact in its own fresh process without imagegem_hf (`run_without_imagegem`).

    Missing folders fail without starting a process.
    """
    checks = []
    for artifact in tqdm(artifacts, desc="loading artifacts in fresh processes", disable=not show_progress):
        if not Path(artifact.folder).exists():
            result = FreshProcessResult(False, "", f"{artifact.folder} does not exist")
        else:
            result = run_without_imagegem(artifact.check_code(), timeout=timeout)
        checks.append(ArtifactCheck(artifact, result))
    return checks


def artifact_table(checks: Sequence[ArtifactCheck]) -> str:
    """A markdown table: artifact · folder · how to load it · card (README.md present) · loaded OK in a fresh process
    (or the last line of the error).

    Example:
        ```python
        >>> from imagegem_hf.artifacts import Artifact, artifact_table, check_artifacts
        >>> dataset = Artifact("dataset", "demo_output/data/dataset", "load_dataset({folder}, 'images')")
        >>> print(artifact_table(check_artifacts([dataset])))  # doctest: +SKIP
        ```
    """
    rows = [
        "| artifact | folder | how to load it | card | loaded in a fresh process |",
        "|---|---|---|---|---|",
    ]
    for check in checks:
        artifact = check.artifact
        card = "README.md" if (artifact.folder / "README.md").is_file() else "missing"
        status = "OK" if check.result.ok else f"FAIL: {check.result.error}"
        load = artifact.load_call().replace("|", "\\|")
        rows.append(f"| {artifact.name} | {artifact.folder} | `{load}` | {card} | {status.replace('|', '/')} |")
    return "\n".join(rows)


def demo_artifacts(output_dir: str | os.PathLike, stages: Sequence[str] | None = None) -> list[Artifact]:
    """The artifacts `imagegem demo` saves under `output_dir`, each with its plain Hugging Face load call.

    Args:
        output_dir: The demo's output folder (`demo_output/`).
        stages: Only the artifacts of these demo stages (default: all).

    Returns:
        `Artifact`s: the dataset, a recommender, the VLM ranker, the DPO LoRA, the W2W space and pipeline, the
        preference model.
    """
    from imagegem_hf.toy.pipeline import TOY_PIPELINE_PATH

    out = Path(output_dir)
    by_stage = {
        "data": Artifact(
            "dataset",
            out / "dataset",
            "load_dataset({folder}, 'images')",
            check="""
            from datasets import load_dataset
            for config in ("images", "loras", "interactions", "preference_pairs"):
                assert len(load_dataset(folder, config, split="train")) > 0, f"config {config} is empty"
            """,
        ),
        "recsys": Artifact(
            "recommender (SASRec)",
            out / "recsys" / "sasrec",
            "safetensors.numpy.load_file({folder} + '/model.safetensors')",
            check="""
            import json
            from safetensors.numpy import load_file
            state = load_file(folder + "/model.safetensors")
            with open(folder + "/vocab.json") as handle:
                items = json.load(handle)["item_ids"]
            assert state and items, "no weights or no item vocabulary"
            """,
        ),
        "ranker": Artifact(
            "VLM ranker",
            out / "ranker" / "ranker",
            "AutoModelForImageTextToText.from_pretrained({folder}); AutoProcessor.from_pretrained({folder})",
            imports="from transformers import AutoModelForImageTextToText, AutoProcessor",
        ),
        "dpo": Artifact(
            "DPO LoRA",
            out / "dpo" / "lora",
            f"StableDiffusionPipeline.from_pretrained({str(TOY_PIPELINE_PATH)!r}).load_lora_weights({{folder}})",
            check=f"""
            from diffusers import StableDiffusionPipeline
            pipe = StableDiffusionPipeline.from_pretrained({str(TOY_PIPELINE_PATH)!r})
            pipe.load_lora_weights(folder)
            assert pipe.get_list_adapters().get("unet"), "no LoRA adapter was loaded into the UNet"
            """,
        ),
        "w2w": [
            Artifact(
                "W2W weight space",
                out / "w2w" / "space",
                "AutoModel.from_pretrained({folder}, trust_remote_code=True)",
                imports="from diffusers import AutoModel",
            ),
            Artifact(
                "W2W edit pipeline",
                out / "w2w" / "pipeline",
                "DiffusionPipeline.from_pretrained({folder}, trust_remote_code=True)",
                imports="from diffusers import DiffusionPipeline",
            ),
        ],
        "preference": Artifact(
            "preference model",
            out / "preference" / "stage2" / "model",
            "AutoModel.from_pretrained({folder}, trust_remote_code=True)",
            imports="from transformers import AutoModel",
        ),
    }
    artifacts = []
    for stage, entry in by_stage.items():
        if stages is None or stage in stages:
            artifacts += entry if isinstance(entry, list) else [entry]
    return artifacts
