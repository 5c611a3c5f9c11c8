"""`WeightSpace`: a PCA space over many LoRAs of one base model (weights2weights, ImageGem §4.3).

Every LoRA is reduced to rank 1 per layer (`rank1_reduce`) and flattened into one vector along an explicit,
stored, ordered module list: per module `down` (rank × in) then `up` (out × rank). Modules a LoRA lacks are
zero-filled (and counted). The sign of each reduced component (its `up` and `down` negated together, which leaves
ΔW alone) is a free choice: the reduction fixes it per LoRA, and `build(align_signs=True)` fixes it by the
population instead, along the principal axis of that component over all the LoRAs (`sign_reference`, stored with
the space and applied to every LoRA projected later). Coordinates are z-scored across models, then PCA gives `m`
components:

    project(θ)   = ((θ − μ) / σ) · Vᵀ
    unproject(p) = p · V · σ + μ

The build streams the LoRAs once (read, reduced and vectorized on worker processes) and only holds the N × d
data matrix when it fits in one block: otherwise the reduced vectors go to a disk cache split into column
blocks, the N × N Gram matrix is accumulated block by block (dual PCA), and its top eigenvectors give the
components in a second pass over the blocks. Memory is O(N² + m·d + one block), so tens of thousands of SDXL
LoRAs (d in the millions) fit on one machine.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from tqdm.auto import tqdm

from .lora_io import W2W_GAUGE_KEY, W2W_GAUGE_VECTOR, LoRA, LoRAModule, read_lora_header
from .reduce import layer_filter
from .vectorize import (
    SharedRows,
    Vectorizer,
    WorkerPool,
    component_groups,
    drop_unreadable,
    known_base,
    report_missing_modules,
    vectorize_into,
)

logger = logging.getLogger(__name__)

SIGN_PASSES = 2  # power iterations of `align_signs` (1, 2, 3 and 5 read the toy LoRAs' attributes about equally well)
SIGN_STEP_ELEMENTS = 2**23  # N × columns per step of the sign passes (bounds their float32 temporaries to 32 MB)

LoRAItem = str | os.PathLike | LoRA | np.ndarray | torch.Tensor


def _hub():
    """imagegem_hf's Hub helpers (atomic saving, card templates, pushing, downloading a repo id).

    Imported when used: this module and its siblings are also saved beside a W2W pipeline as its Hub code, where a
    space is loaded and used with diffusers alone.
    """
    try:
        return importlib.import_module("imagegem_hf.hub")
    except ImportError as error:
        raise ImportError(
            "Saving, pushing or downloading a WeightSpace uses imagegem_hf's Hub helpers and card templates; install "
            "imagegem_hf (`pip install imagegem_hf`), or load a local folder."
        ) from error


class WeightSpace(ModelMixin, ConfigMixin):
    """PCA over rank-reduced LoRAs with an explicit ordered module layout (a diffusers pipeline component).

    Build one with `WeightSpace.build`; the constructor only allocates a space of the given layout (it is what
    `from_pretrained` calls).

    Args:
        module_names: Canonical module names, in vector order.
        module_shapes: `[out_features, in_features]` per module (`in_features` = in_channels·kh·kw for convs).
        kernel_sizes: `[]` for linear layers, `[kh, kw]` for convolutions, per module.
        rank: Components kept per module (1 = ImageGem's rank-1 reduction).
        n_components: Number of principal components `m`.
        n_models: Number of LoRAs the space was built from.
        standardize: Whether coordinates were z-scored across models.
        base: Base architecture of the LoRAs (`"sd15"`, `"sdxl"`, …).
        missing_counts: Per module, how many of the LoRAs lacked it (zero-filled).
        n_ignored_modules: Modules of the input LoRAs outside `module_names` (dropped), summed over LoRAs.
        model_ids: Identifiers of the LoRAs, in the order of the stored `coefficients`.
        total_variance: Total variance of the (standardised) data, the trace of its covariance, so that
            `explained_variance / total_variance` are fractions of all of it (set by `build`).
        aligned_signs: Whether the space holds a `sign_reference` buffer that fixes each reduced component's sign
            (`build(align_signs=True)`); spaces saved without it use the reduction's sign rule alone.

    Example:
        ```python
        >>> from imagegem_hf.w2w import WeightSpace
        >>> files = ["a.safetensors", "b.safetensors", "c.safetensors"]
        >>> space = WeightSpace.build(files, n_components=2)  # doctest: +SKIP
        >>> space.project("a.safetensors").shape  # doctest: +SKIP
        (2,)
        ```
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        module_names: list[str],
        module_shapes: list[list[int]],
        kernel_sizes: list[list[int]] | None = None,
        rank: int = 1,
        n_components: int = 1,
        n_models: int = 0,
        standardize: bool = True,
        base: str = "unknown",
        missing_counts: list[int] | None = None,
        n_ignored_modules: int = 0,
        model_ids: list[str] | None = None,
        total_variance: float | None = None,
        aligned_signs: bool = False,
    ) -> None:
        super().__init__()
        if len(module_names) != len(module_shapes):
            raise ValueError("module_names and module_shapes must have the same length.")
        dim = self.vector_length
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("components", torch.zeros(n_components, dim))
        self.register_buffer("explained_variance", torch.zeros(n_components))
        self.register_buffer("coefficients", torch.zeros(n_models, n_components))
        if aligned_signs:
            self.register_buffer("sign_reference", torch.zeros(dim))

    # ------------------------------------------------------------------ layout
    @property
    def layout(self) -> list[tuple[str, int, int, tuple[int, ...], int]]:
        """`(name, out_features, in_features, kernel_size, offset)` per module, in vector order."""
        out, offset = [], 0
        kernels = self.config.kernel_sizes or [[] for _ in self.config.module_names]
        for name, (n_out, n_in), kernel in zip(
            self.config.module_names, self.config.module_shapes, kernels, strict=True
        ):
            out.append((name, int(n_out), int(n_in), tuple(kernel), offset))
            offset += self.config.rank * (int(n_out) + int(n_in))
        return out

    @property
    def vector_length(self) -> int:
        return sum(self.config.rank * (int(o) + int(i)) for o, i in self.config.module_shapes)

    @property
    def n_components(self) -> int:
        return int(self.config.n_components)

    def training_coefficients(self) -> np.ndarray:
        """PCA coefficients `(n_models, m)` of the LoRAs the space was built from, in `config.model_ids` order."""
        return _numpy(self.coefficients)

    def vectorize(self, lora: LoRA) -> tuple[np.ndarray, list[str], list[str]]:
        """Reduce `lora` to the space's rank and flatten it along the module layout.

        Returns:
            `(vector, missing, ignored)`: the float32 vector, the layout modules the LoRA lacks (zero-filled),
            and the LoRA's modules outside the layout (dropped).

        Raises:
            ValueError: A module's shape differs from the layout's (architecture mismatch).
        """
        return self.vectorizer().vectorize(lora)

    def vectorizer(self) -> Vectorizer:
        """The picklable LoRA → vector map of this space (what `build` runs in its worker processes)."""
        reference = _numpy(self.sign_reference) if self.config.aligned_signs else None
        return Vectorizer(tuple(self.layout), int(self.config.rank), self.vector_length, self.config.base, reference)

    def vector_to_lora(self, vector: np.ndarray | torch.Tensor) -> LoRA:
        """The LoRA (rank `rank` per module, scale 1) whose flattened factors are `vector`.

        Its metadata marks the factors as weight-space coordinates (`W2W_GAUGE_KEY`), and `save_lora` writes the
        mark, so that vectorizing the LoRA or its file (float32) gives back exactly `vector`.
        """
        vector = torch.as_tensor(np.asarray(vector, dtype=np.float32))
        if vector.shape != (self.vector_length,):
            raise ValueError(f"Expected a vector of length {self.vector_length}, got shape {tuple(vector.shape)}.")
        rank, modules = self.config.rank, {}
        for name, n_out, n_in, kernel, offset in self.layout:
            down = vector[offset : offset + rank * n_in].reshape(rank, n_in)
            up = vector[offset + rank * n_in : offset + rank * (n_in + n_out)].reshape(n_out, rank)
            if kernel:
                down = down.reshape(rank, n_in // int(np.prod(kernel)), *kernel)
                up = up.reshape(n_out, rank, 1, 1)
            modules[name] = LoRAModule(down=down.clone(), up=up.clone(), alpha=None)
        return LoRA(modules=modules, base=self.config.base, metadata={W2W_GAUGE_KEY: W2W_GAUGE_VECTOR})

    def _item_vector(self, item: LoRAItem) -> np.ndarray:
        return self.vectorizer()(item)[0]

    # ------------------------------------------------------------------ PCA maps
    def project(self, items: LoRAItem | Sequence[LoRAItem]) -> np.ndarray:
        """PCA coefficients `((θ − μ) / σ) · Vᵀ` of one item (→ `(m,)`) or a sequence / 2-D array (→ `(n, m)`).

        Items are LoRA files, `LoRA` objects or vectors in the space's layout.
        """
        single = not isinstance(items, (list, tuple)) and not (
            isinstance(items, (np.ndarray, torch.Tensor)) and np.ndim(items) == 2
        )
        batch = [items] if single else list(items)
        vectors = np.stack([self._item_vector(item) for item in batch])
        z = (vectors - _numpy(self.mean)) / _numpy(self.std)
        coefficients = z @ _numpy(self.components).T
        return coefficients[0] if single else coefficients

    def unproject(self, coefficients: np.ndarray) -> np.ndarray:
        """Vectors `p · V · σ + μ` for coefficients `(m,)` or `(n, m)`."""
        coefficients = np.asarray(coefficients, dtype=np.float32)
        if coefficients.shape[-1] != self.n_components:
            raise ValueError(f"Expected {self.n_components} coefficients, got shape {coefficients.shape}.")
        return (coefficients @ _numpy(self.components)) * _numpy(self.std) + _numpy(self.mean)

    def to_lora(self, coefficients: np.ndarray) -> LoRA:
        """The LoRA at PCA `coefficients` (`(m,)`): `vector_to_lora(unproject(coefficients))`."""
        return self.vector_to_lora(self.unproject(coefficients))

    def coefficient_direction_to_weights(self, normal: np.ndarray) -> np.ndarray:
        """Map a direction in coefficient space to weight space: `(normal · V) · σ`, unit-normalised.

        Moving a LoRA by `α` times the unnormalised result moves its coefficients by exactly `α · normal`.
        """
        direction = (np.asarray(normal, dtype=np.float32) @ _numpy(self.components)) * _numpy(self.std)
        norm = float(np.linalg.norm(direction))
        if norm == 0:
            raise ValueError("The direction is zero in weight space; the classifier found no signal.")
        return direction / norm

    def edit(self, lora: LoRAItem, directions, strengths, in_subspace: bool = False) -> LoRA:
        """θ + Σ αₖ vₖ: move a LoRA along one or more weight-space directions and return the edited LoRA.

        Args:
            lora: A LoRA file, `LoRA` or vector in the layout. It is reduced to the space's rank first, so
                strength 0 returns the reduced LoRA.
            directions: A `Direction` (see `preference_direction`), a unit vector of length `vector_length`, or a
                list of them.
            strengths: One α per direction (a float for a single direction). Positive α moves towards label +1.
            in_subspace: Edit the PCA reconstruction of θ instead of θ itself (stays inside the space).

        Returns:
            The edited LoRA, ready for `save_lora` / `pipe.load_lora_weights(lora.to_diffusers_state_dict())`.

        Round trips: the edited LoRA carries a mark (`W2W_GAUGE_KEY` in its metadata, written by `save_lora`) that
        its factors are the vector θ + α·v itself, so projecting it, or its float32 file, gives the coefficients
        of θ + α·v, and editing it by −α gives back θ (the ΔW of the unedited, reduced LoRA). A file from
        elsewhere (Civitai, another trainer, or one of ours re-saved by a tool that drops the safetensors
        metadata) has no mark and is reduced to the canonical gauge (top singular component per layer, √s on
        each side, the largest entry of `up` positive, or the sign along the space's `sign_reference` in one
        built with `align_signs=True`): its ΔW is kept, but an edited LoRA that lost its mark lands on
        other coordinates. Files saved in float16 round their factors (≈ 1e-3 relative).

        Example:
            ```python
            >>> edited = space.edit("user_lora.safetensors", direction, 2.0)  # doctest: +SKIP
            >>> save_lora(edited, "user_lora_realistic.safetensors")  # doctest: +SKIP
            ```
        """
        if not isinstance(directions, (list, tuple)):
            directions, strengths = [directions], [strengths]
        if len(directions) != len(np.atleast_1d(strengths)):
            raise ValueError(f"Got {len(directions)} directions but {len(np.atleast_1d(strengths))} strengths.")
        theta = self._item_vector(lora)
        if in_subspace:
            theta = self.unproject(self.project(theta))
        for direction, alpha in zip(directions, np.atleast_1d(strengths), strict=True):
            vector = np.asarray(getattr(direction, "vector", direction), dtype=np.float32)
            if vector.shape != theta.shape:
                raise ValueError(f"Direction has length {vector.shape[0]}, the space {theta.shape[0]}.")
            theta = theta + float(alpha) * vector
        return self.vector_to_lora(theta)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        loras: Sequence[LoRAItem],
        n_components: int,
        standardize: bool = True,
        modules: dict[str, tuple[int, int, tuple[int, ...]]] | None = None,
        rank: int = 1,
        base: str | None = None,
        model_ids: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        block_bytes: int = 256 * 2**20,
        cache_dtype: str = "float32",
        num_workers: int = 1,
        show_progress: bool = True,
        layers: str | None = None,
        on_error: str = "raise",
        align_signs: bool = False,
    ) -> WeightSpace:
        """Build the space from N LoRAs in one streaming pass (dual PCA over the N × N Gram matrix).

        Args:
            loras: LoRA files, `LoRA` objects, or vectors already in the layout (then `modules` is required).
            n_components: Principal components `m` (at most N − 1).
            standardize: z-score each coordinate across models before PCA (as weights2weights does).
            modules: `{name: (out_features, in_features, kernel_size)}` fixing the layout (sorted by name). By
                default the union of the LoRAs' modules, read from the file headers.
            rank: Components kept per module (1 = ImageGem).
            base: Required base architecture; by default the first LoRA's, and all must agree.
            model_ids: Names of the LoRAs (default: file stems or indices).
            cache_dir: Where the temporary column-block cache (N × d float32 on disk) goes; default a temp dir.
            block_bytes: Target size of one column block in memory; a data matrix (N × d float32) up to this size
                stays in memory and nothing is written to `cache_dir`.
            cache_dtype: `"float32"` or `"float16"` (halves the disk cache; PCA is still computed in float32).
            num_workers: Processes that read and reduce LoRAs in parallel (vectors are appended in input order);
                worth it for large collections, where the workers' start-up is amortised.
            show_progress: tqdm bars.
            layers: Keep only the UNet's `"attn_v"` (attention value projections), `"ff"` (feed-forward) or
                `"both"` layers: the paper's alternative to rank-1 reduction (with `rank` = the LoRAs' rank, e.g.
                16). By default every layer of the layout is kept.
            on_error: `"raise"` stops at the first unreadable LoRA file; `"skip"` leaves out (and logs) every file
                that cannot be read or is of another base (see `vectorize.drop_unreadable`).
            align_signs: Fix the sign of each LoRA's reduced components by the population instead of per LoRA:
                per module and component, the principal axis of that component over the N LoRAs is stored
                (`sign_reference`), and every LoRA's component, at the build and whenever a LoRA is projected or
                edited later, is flipped to point along it (ΔW is unchanged). The default, ImageGem's rule (largest
                entry of `up` positive), can put LoRAs whose top components nearly coincide in opposite corners of
                the space: over 64 toy LoRAs half of their components point against the population's axis, and 12
                principal components read the users' true brightness with a leave-one-out R² of 0.53 (0.82
                aligned). Measured effect on edits: README, W2W. Vectors given as `loras` are taken as they are.

        Returns:
            The fitted `WeightSpace` (with the training coefficients in `coefficients`).

        Example:
            ```python
            >>> from pathlib import Path
            >>> from imagegem_hf.w2w import WeightSpace
            >>> files = sorted(Path("loras").glob("*.safetensors"))
            >>> space = WeightSpace.build(files, n_components=64)  # doctest: +SKIP
            >>> space.save_pretrained("w2w_space")  # doctest: +SKIP
            ```
        """
        loras, model_ids = drop_unreadable(loras, model_ids, on_error, base, num_workers)
        n = len(loras)
        if n < 2:
            raise ValueError(f"A weight space needs at least 2 LoRAs, got {n}.")
        if not 1 <= n_components <= n - 1:
            raise ValueError(f"n_components must be in [1, N − 1] = [1, {n - 1}] for N = {n} LoRAs.")
        if model_ids is not None and len(model_ids) != n:
            raise ValueError(f"Got {len(model_ids)} model_ids for {n} LoRAs.")
        # vectors are coordinates already, taken as they are (`project` leaves them alone too)
        align_signs = align_signs and not any(isinstance(item, (np.ndarray, torch.Tensor)) for item in loras)
        with contextlib.ExitStack() as resources:
            pool = resources.enter_context(WorkerPool(num_workers))  # one set of workers for both passes
            if modules is None:
                modules, base = _collect_modules(loras, base, show_progress, pool)
            if layers is not None:
                modules = _select_layers(modules, layers)
            base = base or "unknown"
            names = sorted(modules)
            space = cls(
                module_names=names,
                module_shapes=[[int(modules[k][0]), int(modules[k][1])] for k in names],
                kernel_sizes=[[int(x) for x in modules[k][2]] for k in names],
                rank=rank,
                n_components=n_components,
                n_models=n,
                standardize=standardize,
                base=base,
                model_ids=list(model_ids) if model_ids is not None else None,
                aligned_signs=align_signs,
            )
            ids: list[str] = []
            tmp = resources.enter_context(tempfile.TemporaryDirectory(dir=cache_dir, prefix="w2w-cache-"))
            cache = _BlockCache(Path(tmp), n, space.vector_length, block_bytes, np.dtype(cache_dtype))
            missing = np.zeros(len(names), dtype=np.int64)
            index_of = {name: i for i, name in enumerate(names)}
            ignored = 0

            vectorizer = replace(space.vectorizer(), base=base, sign_reference=None)  # its reference comes after
            rows = SharedRows(Path(tmp) / "rows.f32", pool.in_flight + 1, space.vector_length)  # workers write here
            resources.callback(rows.close)  # before the folder is removed (Windows cannot remove a mapped file)
            reduced = pool.map(partial(vectorize_into, vectorizer, rows), enumerate(loras))
            results = tqdm(reduced, total=n, desc="Reduce + stream LoRAs", disable=not show_progress)
            for index, (item, (lacking, extra)) in enumerate(zip(loras, results, strict=True)):
                ids.append(Path(item).stem if isinstance(item, (str, os.PathLike)) else str(index))
                missing[[index_of[k] for k in lacking]] += 1
                ignored += len(extra)
                cache.append(rows.row(index))
            cache.finish()
            if align_signs:
                groups = component_groups(space.layout, rank, space.vector_length)
                space.sign_reference.copy_(torch.from_numpy(cache.align_signs(groups, show_progress)))
            report_missing_modules(names, missing, n)
            pool.close()
            gram = cache.gram(standardize, show_progress)
            total_variance = float(np.trace(gram)) / (n - 1)
            eigenvalues, eigenvectors = scipy.linalg.eigh(gram, subset_by_index=[n - n_components, n - 1])
            order = np.argsort(eigenvalues)[::-1]
            eigenvalues = np.clip(eigenvalues[order], 0.0, None)
            eigenvectors = eigenvectors[:, order]
            tiny = eigenvalues <= eigenvalues.max(initial=0.0) * 1e-10
            if tiny.any():
                raise ValueError(
                    f"Only {int((~tiny).sum())} of the {n_components} requested components have non-zero variance "
                    f"(the {n} LoRAs span fewer dimensions); lower n_components."
                )
            weights = eigenvectors / np.sqrt(eigenvalues)
            cache.components(weights, space.components.numpy(), show_progress)  # written in place
        if ignored:  # expected when layers are selected
            log = logger.info if layers is not None else logger.warning
            log("Dropped %d module entries outside the weight space layout.", ignored)
        space.register_to_config(
            missing_counts=missing.tolist(),
            n_ignored_modules=int(ignored),
            model_ids=list(model_ids) if model_ids is not None else ids,
            total_variance=total_variance,
        )
        space.mean.copy_(torch.from_numpy(cache.mean))
        space.std.copy_(torch.from_numpy(cache.std))
        space.explained_variance.copy_(torch.from_numpy((eigenvalues / (n - 1)).astype(np.float32)))
        space.coefficients.copy_(torch.from_numpy((eigenvectors * np.sqrt(eigenvalues)).astype(np.float32)))
        return space

    # ------------------------------------------------------------------ hub
    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = True, **kwargs: Any) -> None:
        """Write `config.json` (with an `auto_map`), `diffusion_pytorch_model.safetensors`, this module's code and
        the sibling modules it imports, a model card `README.md` and its figure `explained_variance.png`, atomically.

        The code makes the folder loadable with diffusers alone:
        `diffusers.AutoModel.from_pretrained(folder_or_repo, trust_remote_code=True)`.
        """
        kwargs.pop("safe_serialization", None)
        with _hub().atomic_directory(save_directory, overwrite=overwrite) as tmp:
            super().save_pretrained(tmp, safe_serialization=True, **kwargs)
            module_file = inspect.getfile(type(self))
            for code in [module_file, *get_relative_import_files(module_file)]:
                shutil.copyfile(code, tmp / Path(code).name)
            self.plot_explained_variance(tmp / "explained_variance.png")
            (tmp / "README.md").write_text(self.model_card(), encoding="utf-8")

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        # `auto_map` (read by diffusers' AutoModel) says where the code is; it is no argument of the space
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> WeightSpace:
        """Load a space saved with `save_pretrained` from a local folder or a Hub repo id."""
        subfolder = kwargs.pop("subfolder", None)
        path = Path(path_or_repo_id)
        if not path.is_dir():
            path = _hub().resolve(path_or_repo_id)
        return super().from_pretrained(str(path / subfolder if subfolder else path), **kwargs)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None, **_: Any) -> str:
        """Save to a temporary folder and upload it to `repo_id` (returns the commit URL)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "space")
            return _hub().push_folder(Path(tmp) / "space", repo_id, private=private, token=token)

    def explained_variance_ratio(self) -> np.ndarray:
        """Fraction of the data's total variance along each component (of the kept components' variance when the
        total was not recorded)."""
        variance = _numpy(self.explained_variance).astype(np.float64)
        total = self.config.total_variance or float(variance.sum())
        return variance / total if total > 0 else np.zeros_like(variance)

    def plot_explained_variance(self, path: str | os.PathLike) -> Path:
        """Save a scree plot of the space: the variance fraction of each component (bars) and the cumulative
        fraction (line), as a PNG at `path`.

        Example:
            ```python
            >>> space.plot_explained_variance("scree.png")  # doctest: +SKIP
            ```
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ratio = self.explained_variance_ratio()
        components = np.arange(1, len(ratio) + 1)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(components, ratio, color="tab:blue", label="per component")
        ax.plot(components, np.cumsum(ratio), color="tab:orange", marker=".", label="cumulative")
        ax.set_xlabel("principal component")
        ax.set_ylabel("fraction of the variance")
        ax.set_ylim(0, 1.02)
        base = known_base(self.config.base) or "unknown base"
        ax.set_title(f"W2W space over {self.config.n_models} LoRAs ({base}), {len(ratio)} components")
        ax.legend(loc="center right")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def model_card(self) -> str:
        ratio = self.explained_variance_ratio()
        return _hub().render_card(
            "w2w_space_card.md",
            base=self.config.base,
            n_models=self.config.n_models,
            n_components=self.n_components,
            n_modules=len(self.config.module_names),
            vector_length=self.vector_length,
            rank=self.config.rank,
            standardize=self.config.standardize,
            zero_filled=int(sum(self.config.missing_counts or [])),
            n_ignored_modules=self.config.n_ignored_modules,
            top_variance=[round(float(v), 4) for v in ratio[:10]],
            explained=round(100 * float(ratio.sum()), 1),
        )


# `save_pretrained` writes `auto_map` into config.json (the code is copied beside it)
WeightSpace.register_for_auto_class("AutoModel")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float32 numpy view of a buffer wherever it lives (the pipeline may have moved the space to a GPU)."""
    return tensor.detach().to("cpu", torch.float32).numpy()


def _header_shapes(item: LoRAItem, base: str | None) -> tuple[str | None, dict[str, tuple[int, int, tuple]]]:
    """`(base, {module: (out, in, kernel)})` of one LoRA, from its file header only."""
    if isinstance(item, (np.ndarray, torch.Tensor)):
        raise ValueError("Building from vectors needs `modules` (the layout the vectors follow).")
    if isinstance(item, LoRA):
        return item.base, {name: (m.out_features, m.in_features, m.kernel_size) for name, m in item.modules.items()}
    return read_lora_header(item, base=base)


def _select_layers(modules: dict[str, Any], layers: str) -> dict[str, Any]:
    selected = layer_filter(layers)
    kept = {name: shape for name, shape in modules.items() if selected(name)}
    if not kept:
        raise ValueError(f"None of the {len(modules)} modules of the LoRAs is a {layers} layer.")
    return kept


def _collect_modules(
    loras: Sequence[LoRAItem], base: str | None, show_progress: bool, pool: WorkerPool
) -> tuple[dict[str, tuple[int, int, tuple[int, ...]]], str | None]:
    """Union of the modules of all LoRAs (file headers only), checking that shapes and bases agree."""
    modules: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    headers = pool.map(partial(_header_shapes, base=known_base(base)), loras)
    scanned = tqdm(headers, total=len(loras), desc="Scan LoRA headers", disable=not show_progress)
    for item, (lora_base, shapes) in zip(loras, scanned, strict=True):
        if known_base(lora_base):
            if known_base(base) and lora_base != base:
                raise ValueError(f"Architecture mismatch: {item} is a {lora_base} LoRA, the others are {base}.")
            base = lora_base
        for name, shape in shapes.items():
            if modules.setdefault(name, shape) != shape:
                raise ValueError(
                    f"Architecture mismatch: module {name} is {shape} in {item} but {modules[name]} in another LoRA."
                )
    return modules, base


_TORCH_DTYPES = {np.dtype(d): getattr(torch, d) for d in ("float16", "float32", "float64")}


def _empty(size: int, dtype) -> np.ndarray:
    """An uninitialised 1-D numpy array allocated through torch.

    numpy asks the kernel for transparent huge pages on arrays of 4 MB and more; where the kernel compacts memory
    to honour that (THP defrag "madvise", common on VMs) the first touch of a fresh array runs about 10× slower.
    The caches and statistics below are hundreds of MB touched once, so they use normal pages.
    """
    return torch.empty(size, dtype=_TORCH_DTYPES[np.dtype(dtype)]).numpy()


def _as_float32(values: np.ndarray) -> np.ndarray:
    converted = _empty(values.size, np.float32)
    converted[:] = values
    return converted


class _BlockCache:
    """N vectors of length d, split into column blocks so that a block of all N rows is one sequential read.

    When the whole N × d matrix fits in one block (`block_bytes`) it simply stays in memory. Otherwise rows are
    buffered (`flush_bytes`) and appended to one file per column block. Since a block holds every row of its
    coordinates, the per-coordinate mean and standard deviation are computed block by block in the Gram pass, in
    two passes over the block (centre, then sum the squares) with float64 accumulation: unlike running sums of x
    and x², this loses no digits on coordinates whose mean dwarfs their spread. Appending a row is only a copy.
    """

    def __init__(
        self,
        folder: Path,
        n_rows: int,
        dim: int,
        block_bytes: int,
        dtype: np.dtype,
        flush_bytes: int = 32 * 2**20,
    ):
        if dtype not in (np.float32, np.float16):
            raise ValueError(f"cache_dtype must be float32 or float16, got {dtype}.")
        self.folder, self.n_rows, self.dim, self.dtype = folder, n_rows, dim, dtype
        width = max(1, block_bytes // (4 * n_rows), -(-dim // 256))  # at most 256 block files
        self.bounds = [(start, min(start + width, dim)) for start in range(0, dim, width)]
        self.mean, self.std = _empty(dim, np.float64), _empty(dim, np.float64)  # filled by `gram`
        self.in_memory = n_rows * dim * 4 <= block_bytes
        # One buffer holds the rows awaiting a flush, then each column block read back for the PCA passes:
        # allocating it once avoids page-faulting hundreds of MB of fresh memory per block.
        self.rows_per_flush = n_rows if self.in_memory else min(n_rows, max(1, flush_bytes // (dtype.itemsize * dim)))
        self.buffer = _empty(self.rows_per_flush * dim, dtype)
        self.float_buffer: np.ndarray | None = None  # float32 copy of a float16 block
        self.standardized: np.ndarray | None = None  # the in-memory matrix, standardised once for both passes
        self.signs: np.ndarray | None = None  # (N, groups) ±1 of each row's components, from `align_signs`
        self.groups: np.ndarray | None = None
        self.n_pending = 0
        self.count = 0

    def _path(self, block: int) -> Path:
        return self.folder / f"block_{block:05d}.f32"

    def append(self, vector: np.ndarray) -> None:
        self.buffer[self.n_pending * self.dim : (self.n_pending + 1) * self.dim] = vector  # in the cache dtype
        self.n_pending += 1
        self.count += 1
        if self.n_pending == self.rows_per_flush and not self.in_memory:
            self._flush()

    def _flush(self) -> None:
        rows = self.buffer[: self.n_pending * self.dim].reshape(self.n_pending, self.dim)
        for block, (start, stop) in enumerate(self.bounds):
            with open(self._path(block), "ab") as handle:
                handle.write(np.ascontiguousarray(rows[:, start:stop]).data)
        self.n_pending = 0

    def finish(self) -> None:
        if self.count != self.n_rows:
            raise ValueError(f"Expected {self.n_rows} LoRAs but the sequence yielded {self.count}.")
        if not self.in_memory:
            self._flush()

    def _standardize_(self, data: np.ndarray, start: int, stop: int, standardize: bool | None) -> None:
        """In place, z-score the float32 block `data` `(N, stop − start)` of coordinates `start:stop`; with
        `standardize` not `None`, first compute their mean and standard deviation (ones without `standardize`)
        from the block, which holds what is cached (the statistics of exactly the cached values)."""
        mean, std = self.mean[start:stop], self.std[start:stop]
        if standardize is not None:
            np.add.reduce(data, axis=0, dtype=np.float64, out=mean)
            mean /= self.n_rows
        mean32 = _as_float32(mean)
        data -= mean32
        if standardize is None:
            data /= _as_float32(std)
        elif not standardize:
            std[:] = 1.0
        else:
            np.einsum("ij,ij->j", data, data, dtype=np.float64, out=std)  # squares summed in float64
            std /= self.n_rows
            std -= np.square(mean - mean32)  # the centred block's own mean is the float32 rounding of the mean
            np.sqrt(np.maximum(std, 0.0, out=std), out=std)
            std[std <= 1e-12 * np.maximum(np.abs(mean), 1.0)] = 1.0  # constant coordinates stay at 0 after centring
            data /= _as_float32(std)

    def _raw_blocks(self, desc: str, show_progress: bool):
        """Yield `(start, stop, x)` per column block, x the cached `(N, stop − start)` values as float32 (before
        signs and standardisation; a view into a reused buffer, valid until the next block)."""
        if self.in_memory:
            matrix = self.buffer.reshape(self.n_rows, self.dim)
            for start, stop in tqdm(self.bounds, desc=desc, disable=not show_progress):
                yield start, stop, matrix[:, start:stop].astype(np.float32, copy=False)
            return
        yield from self._read_blocks(desc, show_progress)

    def _read_blocks(self, desc: str, show_progress: bool):
        size = self.n_rows * max(stop - start for start, stop in self.bounds)
        if self.buffer.size < size:
            self.buffer = _empty(size, self.dtype)
        if self.dtype != np.float32 and self.float_buffer is None:
            self.float_buffer = _empty(size, np.float32)
        for block, (start, stop) in enumerate(tqdm(self.bounds, desc=desc, disable=not show_progress)):
            count = self.n_rows * (stop - start)
            raw = self.buffer[:count]
            with open(self._path(block), "rb") as handle:
                if handle.readinto(raw.view(np.uint8)) != raw.nbytes:
                    raise OSError(f"The weight-space cache file {self._path(block)} is shorter than expected.")
            if self.float_buffer is not None:
                data = self.float_buffer[:count]
                data[:] = raw
            else:
                data = raw
            yield start, stop, data.reshape(self.n_rows, stop - start)

    def align_signs(self, groups: np.ndarray, show_progress: bool) -> np.ndarray:
        """Fix the sign of every cached component by the principal axis of its module's components; returns the
        axes (a vector in the layout, unit-norm per component group), which the later passes apply.

        For each group g (one singular component of one module, `vectorize.component_groups`), the axis is the
        top right singular vector of the N × |g| matrix of that component across the cached rows (uncentred, so
        sign-invariant: it is the direction the rows share whatever their signs), found by `SIGN_PASSES` power
        iterations from the rows' sum, one pass over the cache each. Row i's component is then negated where its
        dot product with the axis is negative.
        """
        n_groups = int(groups.max(initial=-1)) + 1
        scores = np.ones((self.n_rows, n_groups), dtype=np.float64)  # first pass: the axis is the rows' sum
        axis = np.empty(self.dim, dtype=np.float64)
        width = self._sign_step
        for step in range(SIGN_PASSES):
            new_scores, row_scores = np.zeros_like(scores), scores.astype(np.float32)
            for start, stop, x in self._raw_blocks(f"Sign axes ({step + 1}/{SIGN_PASSES})", show_progress):
                for chunk in range(start, stop, width):
                    end = min(chunk + width, stop)
                    block, block_groups = x[:, chunk - start : end - start], groups[chunk:end]
                    if np.all(block_groups[1:] >= block_groups[:-1]):  # rank 1: each group is one run of columns
                        bounds = np.flatnonzero(np.r_[True, block_groups[1:] != block_groups[:-1], True])
                        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                            group, run = block_groups[a], block[:, a:b]
                            weights = row_scores[:, group] @ run  # Xᵀ·scores
                            axis[chunk + a : chunk + b] = weights
                            new_scores[:, group] += run @ weights  # X·axis
                        continue
                    gathered = row_scores[:, block_groups]
                    gathered *= block
                    weights = gathered.sum(axis=0, dtype=np.float64)  # Xᵀ·scores, per column
                    axis[chunk:end] = weights
                    np.multiply(block, weights.astype(np.float32), out=gathered)
                    spread = scipy.sparse.csr_matrix(
                        (np.ones(end - chunk), (np.arange(end - chunk), block_groups)), shape=(end - chunk, n_groups)
                    )
                    new_scores += gathered @ spread  # X·axis, summed per group
            norms = np.sqrt(np.bincount(groups, weights=axis**2, minlength=n_groups))
            norms[norms == 0] = 1.0
            axis /= norms[groups]
            scores = new_scores / norms
        self.signs = np.where(scores < 0, -1.0, 1.0).astype(np.float32)
        self.groups = groups
        return axis.astype(np.float32)

    @property
    def _sign_step(self) -> int:
        """Columns per step of the sign passes."""
        return max(1, SIGN_STEP_ELEMENTS // self.n_rows)

    def _apply_signs_(self, data: np.ndarray, start: int, stop: int) -> None:
        if self.signs is not None:
            for chunk in range(start, stop, self._sign_step):
                end = min(chunk + self._sign_step, stop)
                data[:, chunk - start : end - start] *= self.signs[:, self.groups[chunk:end]]

    def _blocks(self, desc: str, show_progress: bool, standardize: bool | None = None):
        """Yield `(start, stop, z)` per column block, z the standardised `(N, stop − start)` float32 block (a view
        into a reused buffer, valid until the next block); with `standardize` not `None` (the first pass) the
        statistics are computed on the way."""
        if self.in_memory:
            first = self.standardized is None
            if first:  # standardise in place (float32) once: both passes read the same Z
                matrix = self.buffer.reshape(self.n_rows, self.dim)
                if matrix.dtype != np.float32:
                    matrix = _empty(matrix.size, np.float32).reshape(matrix.shape)
                    matrix[:] = self.buffer.reshape(matrix.shape)
                self.standardized = matrix
            for start, stop in tqdm(self.bounds, desc=desc, disable=not show_progress):
                z = self.standardized[:, start:stop]
                if first:
                    self._apply_signs_(z, start, stop)
                    self._standardize_(z, start, stop, standardize)
                yield start, stop, z
            return
        for start, stop, data in self._read_blocks(desc, show_progress):
            self._apply_signs_(data, start, stop)
            self._standardize_(data, start, stop, standardize)
            yield start, stop, data

    def gram(self, standardize: bool, show_progress: bool) -> np.ndarray:
        """The N × N Gram matrix Z·Zᵀ of the standardised rows; computes `mean` and `std` on the way."""
        gram = np.zeros((self.n_rows, self.n_rows), dtype=np.float64)
        for _, _, z in self._blocks("Gram (dual PCA)", show_progress, standardize):
            gram += z @ z.T
        return gram

    def components(self, weights: np.ndarray, out: np.ndarray, show_progress: bool) -> None:
        """V = (U Λ^-½)ᵀ Z, one column block at a time, written into `out` `(m, d)` float32 (after `gram`)."""
        weights_t = weights.T.astype(np.float32)
        for start, stop, z in self._blocks("Components", show_progress):
            np.matmul(weights_t, z, out=out[:, start:stop])
