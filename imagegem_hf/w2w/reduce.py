"""Reduce LoRAs of any rank to a fixed-size canonical form (ImageGem §4.3).

Civitai LoRAs differ in rank and in which layers they touch. ImageGem keeps, per layer, only the top singular
component of ΔW = (α/r)·up·down. `rank1_reduce` computes it from the factors alone, so ΔW (m×n) is never formed.
With `"gram"` (default): the r×r Gram matrices upᵀ·up and down·downᵀ (one matrix product per factor, at BLAS
peak), a Cholesky root L·Lᵀ = down·downᵀ in float64, and the top eigenpair of the r×r core Lᵀ·(upᵀ·up)·L give
the singular vectors as up·x_up and downᵀ·x_down; `"qr"` (Householder QR of both factors and an r×r SVD) is
slower, for ill-conditioned factors. The singular value is split as √s on each side and the sign is fixed
(largest-magnitude entry of `u` positive), so equal LoRAs always give equal vectors; a `WeightSpace` built with
`align_signs=True` re-fixes it by the population, which keeps LoRAs whose top components nearly coincide on the
same side of the space. `select_layers` is the
paper's alternative: keep only the `attn_v` and/or feed-forward layers at a fixed rank.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .lora_io import W2W_GAUGE_KEY, W2W_GAUGE_VECTOR, LoRA, LoRAModule

LAYER_GROUPS = {
    "attn_v": (".to_v",),
    "ff": (".ff.net.0.proj", ".ff.net.2"),
    "both": (".to_v", ".ff.net.0.proj", ".ff.net.2"),
}


def _gram_root(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For Gram matrices G = B·Bᵀ (float64, `(..., r, r)`): a root `L` with L·Lᵀ = G, and which matrices needed the
    eigendecomposition (`None` if none did).

    `L` is the lower Cholesky factor where G is positive definite; where it is singular (a rank-deficient factor,
    e.g. zero-padded ranks) L = V·Λ^½ from the eigendecomposition, with the null space zeroed.
    """
    lower, info = torch.linalg.cholesky_ex(gram)
    singular = info != 0
    if not bool(singular.any()):
        return lower, None
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    root = eigenvalues.clamp(min=0.0).sqrt()
    tolerance = root.amax(dim=-1, keepdim=True) * 1e-7 * gram.shape[-1]
    root = torch.where(root > tolerance, root, torch.zeros_like(root))
    return torch.where(singular[..., None, None], eigenvectors * root[..., None, :], lower), singular


def _solve_root_transposed(root: torch.Tensor, singular: torch.Tensor | None, rhs: torch.Tensor) -> torch.Tensor:
    """L⁻ᵀ·rhs for the roots of `_gram_root` (the pseudo-inverse where L came from the eigendecomposition)."""
    if singular is None:
        return torch.linalg.solve_triangular(root.mT, rhs, upper=True)
    safe = torch.where(singular[..., None, None], torch.eye(root.shape[-1], dtype=root.dtype), root)
    solved = torch.linalg.solve_triangular(safe.mT, rhs, upper=True)
    pinv_t = torch.linalg.pinv(root.mT)  # eigen roots: L = V·Λ^½ → L⁺ᵀ = V·Λ^-½ on the non-null part
    return torch.where(singular[..., None, None], pinv_t @ rhs, solved)


def _core_top(
    gram_up: torch.Tensor, gram_down: torch.Tensor, scale: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` singular triplets of ΔW = scale·up·down from the float64 Gram matrices upᵀ·up and
    down·downᵀ alone.

    With down·downᵀ = L·Lᵀ, Q = downᵀ·L⁻ᵀ has orthonormal columns and ΔWᵀ·ΔW = Q·M·Qᵀ with the r×r
    M = scale²·Lᵀ·(upᵀ·up)·L. An eigenpair (σ², y) of M gives v = Q·y = downᵀ·(L⁻ᵀ·y) and
    u = ΔW·v/σ = up·(scale·L·y/σ). Only one r×r root is needed, and `up` may be rank deficient.

    Returns:
        `(x_up, x_down, s)`: `(..., r, rank)` matrices with up·x_up = U·√s and downᵀ·x_down = V·√s (columns
        already normalised through the Gram matrices; zero for null or padded components) and the singular values
        `(..., rank)`.
    """
    root, singular = _gram_root(gram_down)
    scale = torch.as_tensor(scale, dtype=torch.float64)[..., None, None]
    # numpy's stacked matmul is 3× faster than torch's for many tiny float64 matrices; the eigensolvers read
    # only the lower triangle, so the rounding asymmetry of the product does not matter
    core = scale**2 * torch.from_numpy(np.matmul(np.matmul(root.mT.numpy(), gram_up.numpy()), root.numpy()))
    if rank == 1:
        top_value, top_vector = _top_eigenpair(core)
        values, vectors = top_value[..., None], top_vector[..., None]
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(core)  # ascending
        keep = min(rank, eigenvalues.shape[-1])
        values, vectors = eigenvalues[..., -keep:].flip(-1), eigenvectors[..., -keep:].flip(-1)
    s = values.clamp(min=0.0).sqrt()
    positive = s > s[..., :1] * 1e-12  # also False everywhere for a zero ΔW
    x_down = _solve_root_transposed(root, singular, vectors)
    x_up = scale * (root @ vectors)
    # Normalise through the Grams (|up·x|² = xᵀ·upᵀup·x), which also removes the rounding of the implicit Q.
    norm_up = torch.einsum("...ik,...ij,...jk->...k", x_up, gram_up, x_up).clamp(min=0.0).sqrt()
    norm_down = torch.einsum("...ik,...ij,...jk->...k", x_down, gram_down, x_down).clamp(min=0.0).sqrt()
    root_s = torch.where(positive, s.sqrt(), torch.zeros_like(s))
    x_up = x_up * (root_s / norm_up.clamp(min=1e-300))[..., None, :]
    x_down = x_down * (root_s / norm_down.clamp(min=1e-300))[..., None, :]
    s = torch.where(positive, s, torch.zeros_like(s))
    if s.shape[-1] < rank:  # the LoRA has lower rank than asked: zero components
        pad = rank - s.shape[-1]
        x_up, x_down = (torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1) for x in (x_up, x_down))
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], pad)], dim=-1)
    return x_up, x_down, s


def _top_eigenpair(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue and a unit eigenvector of a batch of symmetric matrices `(..., r, r)` (float64).

    LAPACK's `dsyevr` asked for the top eigenpair only (`range="I"`: bisection and inverse iteration on the
    tridiagonal form) costs about half of the eigenvalues-only `eigvalsh` of the whole batch.
    """
    from scipy.linalg import lapack

    n = gram.shape[-1]
    flat = gram.reshape(-1, n, n).numpy()
    values, vectors = np.empty(len(flat)), np.empty((len(flat), n))
    for i, matrix in enumerate(flat):
        value, vector, _, _, info = lapack.dsyevr(matrix, compute_v=1, range="I", il=n, iu=n)
        if info != 0:
            raise np.linalg.LinAlgError(f"dsyevr failed (info={info}) on an r×r core matrix")
        values[i], vectors[i] = value[0], vector[:, 0]
    return torch.from_numpy(values).reshape(gram.shape[:-2]), torch.from_numpy(vectors).reshape(gram.shape[:-1])


def _fix_signs_(u: torch.Tensor, vt: torch.Tensor) -> None:
    """In place: flip each component (column of `u` `(..., m, k)`, row of `vt` `(..., k, n)`) so that the
    largest-magnitude entry of its `u` is positive (zero components stay zero)."""
    if u.dim() == 2 and u.shape[1] == 1 and u.device.type == "cpu" and not u.requires_grad:  # numpy: 5× cheaper
        values = u.numpy().reshape(-1)
        if values[np.abs(values).argmax()] < 0:
            u.neg_()
            vt.neg_()
        return
    peaks = u.gather(-2, u.abs().argmax(dim=-2, keepdim=True))  # (..., 1, k)
    negative = peaks < 0
    if bool(negative.any()):
        signs = torch.where(negative, -1.0, 1.0).to(u.dtype)
        u.mul_(signs)
        vt.mul_(signs.mT)


@torch.no_grad()
def top_singular_factors(
    up: torch.Tensor, down: torch.Tensor, scale: float | torch.Tensor = 1.0, rank: int = 1, method: str = "gram"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of `scale · up @ down` from the factors, with √s split and a fixed sign.

    Leading batch dimensions are supported (a batch of same-shaped modules is reduced in one call).

    Args:
        up: `(..., m, r)`.
        down: `(..., r, n)`.
        scale: The LoRA scale alpha / r (a float, or a tensor broadcasting over the batch dimensions).
        rank: Number of components kept; components beyond the LoRA's rank are zero.
        method: `"gram"` (the r×r Gram matrices in float64, a Cholesky root of down·downᵀ or its
            eigendecomposition where singular, and the top eigenpairs of an r×r core) or `"qr"` (Householder QR of
            both factors and an SVD of the core: slower, for ill-conditioned factors).

    Returns:
        `(u, v, s)`: `u` `(..., m, rank)` = U·√s, `v` `(..., n, rank)` = V·√s, and the singular values `s`
        `(..., rank)`, so that `u @ vᵀ` is the best rank-`rank` approximation of ΔW. In each column the
        largest-magnitude entry of `u` is positive.

    Example:
        ```python
        >>> import torch
        >>> from imagegem_hf.w2w.reduce import top_singular_factors
        >>> up, down = torch.randn(6, 3), torch.randn(3, 5)
        >>> u, v, s = top_singular_factors(up, down)
        >>> torch.allclose(s[0], torch.linalg.svdvals(up @ down)[0], atol=1e-4)
        True
        ```
    """
    dtype = up.dtype
    if method == "gram":
        x_up, x_down, s = _core_top(
            (up.mT @ up).double(), (down @ down.mT).double(), torch.as_tensor(scale, dtype=torch.float64), rank
        )
        u, vt = up @ x_up.to(dtype), x_down.mT.to(dtype) @ down
    elif method == "qr":
        q_up, r_up = torch.linalg.qr(up)  # (m, k1), (k1, r)
        q_down, r_down = torch.linalg.qr(down.mT)  # (n, k2), (k2, r)
        scale = torch.as_tensor(scale, dtype=torch.float64)[..., None, None]
        core = (r_up @ r_down.mT).double() * scale  # (k1, k2), at most r × r
        u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
        keep = min(rank, s.shape[-1])
        s = s[..., :keep]
        root_s = torch.where(s > s[..., :1] * 1e-12, s.sqrt(), torch.zeros_like(s))
        u = q_up @ (u_core[..., :keep] * root_s[..., None, :]).to(dtype)
        vt = (vh_core[..., :keep, :] * root_s[..., :, None]).to(dtype) @ q_down.mT
        s = root_s**2
        if keep < rank:
            pad = rank - keep
            u = torch.cat([u, u.new_zeros(*u.shape[:-1], pad)], dim=-1)
            vt = torch.cat([vt, vt.new_zeros(*vt.shape[:-2], pad, vt.shape[-1])], dim=-2)
            s = torch.cat([s, s.new_zeros(*s.shape[:-1], pad)], dim=-1)
    else:
        raise ValueError(f"Unknown method {method!r}; use 'gram' or 'qr'.")
    _fix_signs_(u, vt)
    return u, vt.mT, s.to(dtype)


def coordinate_modules(lora: LoRA, rank: int) -> set[str]:
    """The modules whose factors `reduced_factors` keeps as they are: those of rank `rank` in a LoRA written from a
    weight-space vector (its metadata holds `W2W_GAUGE_KEY`), whose factors are its coordinates."""
    if lora.metadata.get(W2W_GAUGE_KEY) != W2W_GAUGE_VECTOR:
        return set()
    return {name for name, module in lora.modules.items() if module.rank == rank}


@torch.no_grad()
def reduced_factors(
    lora: LoRA,
    rank: int = 1,
    method: str = "gram",
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the best rank-`rank` approximation of ΔW as `(up (out × rank), down (rank × in·kh·kw))`, scale 1.

    With `"gram"`, all modules of one LoRA rank share one batched r×r computation whatever their shapes; only the
    r×r Gram matrices are stacked, the factors are never copied. fp16/bf16 factors (e.g. from `map_lora`) are
    upcast to float32 one module at a time into a small reused buffer, read once for the Gram matrices and once
    to apply the singular vectors. Modules missing from `out` are skipped when `out` is given; the results are
    written into its `(up, down)` tensors (e.g. views into a weight-space vector).

    A LoRA written from a weight-space vector (`WeightSpace.vector_to_lora`, e.g. an edit; its metadata holds
    `W2W_GAUGE_KEY`) keeps the factors of its rank-`rank` modules as they are: an edit θ + α·v is not in the
    canonical gauge (√s split, sign rule), and re-canonicalising it would move it to other coordinates of the
    space (ΔW is the same either way). Everything else is reduced to the canonical gauge.

    Example:
        ```python
        >>> from imagegem_hf.w2w import load_lora
        >>> from imagegem_hf.w2w.reduce import reduced_factors
        >>> factors = reduced_factors(load_lora("civitai_lora.safetensors"))  # doctest: +SKIP
        ```
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}.")
    names = [n for n in lora.modules if out is None or n in out]
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    kept = coordinate_modules(lora, rank)
    for name in [n for n in names if n in kept]:  # in the LoRA's module order
        module = lora.modules[name]
        results[name] = (module.up_2d().float() * module.scale, module.down_2d().float())
        names.remove(name)
    if method == "gram":
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(lora.modules[name].rank, []).append(name)
    else:  # QR needs stacked same-shaped factors
        groups = {}
        for name in names:
            module = lora.modules[name]
            groups.setdefault((module.out_features, module.in_features, module.rank), []).append(name)
    low_precision = [m for m in lora.modules.values() if m.up.dtype not in (torch.float32, torch.float64)]
    largest = max((max(m.up.numel(), m.down.numel()) for m in low_precision), default=0)
    scratch = torch.empty(2, largest, dtype=torch.float32)  # fp16/bf16 factors are upcast here, module by module
    views: dict[tuple, torch.Tensor] = {}  # (slot, shape) → view of the scratch (a dozen shapes per LoRA)

    def upcast(factor: torch.Tensor, slot: int) -> torch.Tensor:
        if factor.dtype in (torch.float32, torch.float64):
            return factor
        view = views.get((slot, factor.shape))
        if view is None:
            view = views[slot, factor.shape] = scratch[slot, : factor.numel()].view(factor.shape)
        return view.copy_(factor)

    for group in groups.values():
        batch = [lora.modules[n] for n in group]
        ups, downs = [m.up_2d() for m in batch], [m.down_2d() for m in batch]
        scales = torch.tensor([m.scale for m in batch], dtype=torch.float64)
        if method == "gram":
            work = torch.float64 if ups[0].dtype == torch.float64 else torch.float32
            r = batch[0].rank
            gram_up, gram_down = torch.empty(len(batch), r, r, dtype=work), torch.empty(len(batch), r, r, dtype=work)
            for a, b, g_up, g_down in zip(ups, downs, gram_up.unbind(), gram_down.unbind(), strict=True):
                a, b = upcast(a, 0), upcast(b, 1)
                torch.matmul(a.mT, a, out=g_up)
                torch.matmul(b, b.mT, out=g_down)
            x_up, x_down, _ = _core_top(gram_up.double(), gram_down.double(), scales, rank)
            x_ups, x_downs = x_up.to(work).unbind(), x_down.mT.to(work).contiguous().unbind()
            for name, a, b, x_a, x_b in zip(group, ups, downs, x_ups, x_downs, strict=True):
                a, b = upcast(a, 0), upcast(b, 1)
                target = out.get(name) if out is not None else None
                if target is not None and target[0].dtype == work:
                    u, vt = torch.matmul(a, x_a, out=target[0]), torch.matmul(x_b, b, out=target[1])
                else:
                    u, vt = a @ x_a, x_b @ b
                _fix_signs_(u, vt)
                results[name] = (u, vt)
        else:
            work = torch.float64 if ups[0].dtype == torch.float64 else torch.float32
            stacked_up, stacked_down = torch.stack(ups).to(work), torch.stack(downs).to(work)
            u, v, _ = top_singular_factors(stacked_up, stacked_down, scales, rank, method)
            for i, name in enumerate(group):
                results[name] = (u[i], v[i].mT)
    if out is not None:
        for name, (u, vt) in results.items():
            if u.data_ptr() != out[name][0].data_ptr():
                out[name][0].copy_(u)
                out[name][1].copy_(vt)
    return results


def _canonical_module(u: torch.Tensor, vt: torch.Tensor, like: LoRAModule) -> LoRAModule:
    """Factors `u` (out, k), `vt` (k, in·kh·kw) as a scale-1 module shaped like `like` (conv shapes kept)."""
    rank = u.shape[-1]
    kernel = like.kernel_size
    if kernel:  # conv: down (k, in, kh, kw), up (out, k, 1, 1)
        return LoRAModule(
            down=vt.reshape(rank, like.down.shape[1], *kernel), up=u.reshape(u.shape[0], rank, 1, 1), alpha=None
        )
    return LoRAModule(down=vt.contiguous(), up=u.contiguous(), alpha=None)


def reduce_rank(lora: LoRA, rank: int = 1, method: str = "gram") -> LoRA:
    """Replace every module of `lora` by its top-`rank` singular components (computed from the factors).

    Modules of the same LoRA rank share one batched r×r computation (see `reduced_factors`).

    Example:
        ```python
        >>> from imagegem_hf.w2w import load_lora
        >>> from imagegem_hf.w2w.reduce import reduce_rank
        >>> lora4 = reduce_rank(load_lora("civitai_lora.safetensors"), rank=4)  # doctest: +SKIP
        ```
    """
    factors = reduced_factors(lora, rank, method)
    modules = {name: _canonical_module(u, vt, lora.modules[name]) for name, (u, vt) in factors.items()}
    return LoRA(modules=modules, base=lora.base, source_format=lora.source_format, metadata=dict(lora.metadata))


def rank1_reduce(lora: LoRA, method: str = "gram") -> LoRA:
    """ImageGem's reduction: per layer the top-1 singular component of ΔW = (α/r)·up·down, as a rank-1 LoRA.

    Each module becomes `up = √s·u` (m×1) and `down = √s·vᵀ` (1×n) with the largest-magnitude entry of `u`
    positive, computed from orthogonal factorizations of up and downᵀ and an r×r SVD (ΔW is never formed).
    Convolution LoRAs are reduced on their flattened `(out, in·kh·kw)` form and reshaped back.

    Args:
        lora: A LoRA of any rank (per module ranks may differ).
        method: How the R factors are obtained: `"gram"` (fast, default) or `"qr"` (Householder).

    Returns:
        The rank-1 LoRA (scale 1 on every module).

    Example:
        ```python
        >>> from imagegem_hf.w2w import load_lora, rank1_reduce
        >>> lora = rank1_reduce(load_lora("civitai_lora.safetensors"))  # doctest: +SKIP
        >>> set(lora.ranks.values())  # doctest: +SKIP
        {1}
        ```
    """
    return reduce_rank(lora, rank=1, method=method)


def select_layers(lora: LoRA, layers: str = "both", rank: int | None = None) -> LoRA:
    """The paper's alternative to rank-1 reduction: keep only the `attn_v` and/or feed-forward layers.

    Args:
        lora: The LoRA.
        layers: `"attn_v"` (attention value projections), `"ff"` (feed-forward layers) or `"both"`.
        rank: If given, every kept module must have exactly this rank (ImageGem uses rank-16 LoRAs);
            a LoRA of another rank is rejected.

    Returns:
        A LoRA with only the selected modules.

    Example:
        ```python
        >>> from imagegem_hf.w2w import load_lora
        >>> from imagegem_hf.w2w.reduce import select_layers
        >>> ff_only = select_layers(load_lora("rank16.safetensors"), "ff", rank=16)  # doctest: +SKIP
        ```
    """
    selected = layer_filter(layers)
    modules = {name: m for name, m in lora.modules.items() if selected(name)}
    if not modules:
        raise ValueError(f"The LoRA has no {layers} layers; it cannot be used with select_layers({layers!r}).")
    if rank is not None:
        wrong = sorted({m.rank for m in modules.values()} - {rank})
        if wrong:
            raise ValueError(
                f"select_layers(rank={rank}) needs rank-{rank} LoRAs, but this one has ranks {wrong}. Use "
                "rank1_reduce (any rank) or reduce_rank(lora, rank) first."
            )
    return LoRA(modules=modules, base=lora.base, source_format=lora.source_format, metadata=dict(lora.metadata))


def layer_filter(layers: str) -> Callable[[str], bool]:
    """Whether a canonical module name is one of the UNet's `"attn_v"`, `"ff"` or `"both"` layers."""
    if layers not in LAYER_GROUPS:
        raise ValueError(f"Unknown layer group {layers!r}; choose from {sorted(LAYER_GROUPS)}.")
    suffixes = LAYER_GROUPS[layers]
    return lambda name: name.startswith("unet.") and name.endswith(suffixes)
