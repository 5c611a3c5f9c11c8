"""Reduce LoRAs of any rank to a fixed-size canonical form (ImageGem §4.3).

Civitai LoRAs differ in rank and in which layers they touch. ImageGem keeps, per layer, only the top singular
component of ΔW = (α/r)·up·down. `rank1_reduce` computes it from the factors alone: factor `up` (m×r) and
`downᵀ` (n×r) as Q·R with orthonormal Q, take the SVD of the r×r product R_up·R_downᵀ, and map the singular
vectors back through Q, so ΔW (m×n) is never formed. Two ways to get the R factors: `"gram"` (default) from the
r×r Gram matrices upᵀ·up = Rᵀ·R (one matrix product per factor, then an r×r Cholesky in float64; Q is
never formed, only applied to the top vectors) and `"qr"` (Householder QR, slower, for ill-conditioned
factors). The singular value is split as √s on each side and the sign is fixed (largest-magnitude entry of `u`
positive), so equal LoRAs always give equal vectors. `select_layers` is the paper's alternative: keep only the
`attn_v` and/or feed-forward layers at a fixed rank.
"""

from __future__ import annotations

import torch

from imagegem_hf.w2w.lora_io import LoRA, LoRAModule

LAYER_GROUPS = {
    "attn_v": (".to_v",),
    "ff": (".ff.net.0.proj", ".ff.net.2"),
    "both": (".to_v", ".ff.net.0.proj", ".ff.net.2"),
}


def _gram_roots(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For Gram matrices AᵀA (float64): `R` with AᵀA = RᵀR (so A = Q·R, Q orthonormal) and a pseudo-inverse of R.

    Cholesky (R upper triangular) where AᵀA is positive definite; where it is singular (a rank-deficient
    factor, e.g. zero-padded ranks) R = Λ^½·Vᵀ from the eigendecomposition, with the null space dropped.
    """
    lower, info = torch.linalg.cholesky_ex(gram)
    r = lower.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype).expand_as(gram)
    r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
    singular = info != 0
    if bool(singular.any()):
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        root = eigenvalues.clamp(min=0.0).sqrt()
        tolerance = root.amax(dim=-1, keepdim=True) * 1e-7 * gram.shape[-1]
        inverse = torch.where(root > tolerance, 1.0 / root.clamp(min=1e-300), torch.zeros_like(root))
        root = torch.where(root > tolerance, root, torch.zeros_like(root))
        r_eig, r_inv_eig = root[..., :, None] * eigenvectors.mT, eigenvectors * inverse[..., None, :]
        mask = singular[..., None, None]
        r, r_inv = torch.where(mask, r_eig, r), torch.where(mask, r_inv_eig, r_inv)
    return r, r_inv


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
        method: `"gram"` (R factors by Cholesky of the r×r Gram matrices in float64, eigendecomposition where
            they are singular; top singular pairs of the r×r core from its eigendecomposition) or `"qr"`
            (Householder QR and an SVD of the core).

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
        x_up, x_down, s, positive = _core_top(
            (up.mT @ up).double(), (down @ down.mT).double(), torch.as_tensor(scale, dtype=torch.float64), rank
        )
        u, v = up @ x_up.to(dtype), down.mT @ x_down.to(dtype)
    elif method == "qr":
        q_up, r_up = torch.linalg.qr(up)  # (m, k1), (k1, r)
        q_down, r_down = torch.linalg.qr(down.mT)  # (n, k2), (k2, r)
        scale = torch.as_tensor(scale, dtype=torch.float64)[..., None, None]
        core = (r_up @ r_down.mT).double() * scale  # (k1, k2), at most r × r
        u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
        keep = min(rank, s.shape[-1])
        s = s[..., :keep]
        u = q_up @ u_core[..., :keep].to(dtype)
        v = q_down @ vh_core[..., :keep, :].mT.to(dtype)
        positive = s > s[..., :1] * 1e-12
    else:
        raise ValueError(f"Unknown method {method!r}; use 'gram' or 'qr'.")
    return _finish(u, v, s, positive, rank)


def _core_top(
    gram_up: torch.Tensor, gram_down: torch.Tensor, scale: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the float64 Gram matrices upᵀ·up and down·downᵀ: `x_up`, `x_down` (r × k) with u = up·x_up and
    v = downᵀ·x_down the top-k singular vectors (before normalisation), the singular values, and which are > 0."""
    r_up, r_up_inv = _gram_roots(gram_up)
    r_down, r_down_inv = _gram_roots(gram_down)
    core = (r_up @ r_down.mT) * scale[..., None, None]
    gram = core @ core.mT
    if rank == 1:
        top_value, top_vector = _top_eigenpair(gram)
        u_core, s = top_vector[..., None], top_value.clamp(min=0.0).sqrt()[..., None]
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        keep = min(rank, eigenvalues.shape[-1])
        u_core = eigenvectors[..., -keep:].flip(-1)
        s = eigenvalues[..., -keep:].flip(-1).clamp(min=0.0).sqrt()
    positive = s > s[..., :1] * 1e-12
    v_core = (core.mT @ u_core) / torch.where(positive, s, torch.ones_like(s))[..., None, :]
    return r_up_inv @ u_core, r_down_inv @ v_core, s, positive


def _top_eigenpair(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue and a unit eigenvector of a batch of symmetric PSD matrices `(..., r, r)` (float64).

    The eigenvalues alone (`eigvalsh`) cost a third of a full `eigh`; the top eigenvector then follows from two
    steps of inverse iteration shifted just above the top eigenvalue, which converge at once (the shifted matrix
    is nearly singular exactly along that eigenvector).
    """
    top = torch.linalg.eigvalsh(gram)[..., -1]
    scale = top.abs().clamp(min=torch.finfo(gram.dtype).tiny)
    shifted = gram - (top + 1e-12 * scale)[..., None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype)
    vector = torch.ones(gram.shape[:-1], dtype=gram.dtype)
    for _ in range(2):
        vector = torch.linalg.solve(shifted, vector)
        vector = vector / vector.abs().amax(dim=-1, keepdim=True)  # rescale first: the solve's result is huge
        vector = vector / vector.norm(dim=-1, keepdim=True)
    unresolved = ~torch.isfinite(vector).all(dim=-1)  # a zero matrix: every unit vector is an eigenvector
    if bool(unresolved.any()):
        vector[unresolved] = torch.nn.functional.one_hot(torch.tensor(0), gram.shape[-1]).to(gram.dtype)
    return top, vector


def _finish(
    u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, positive: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-normalise the singular vectors, zero the null components, fix the sign, split √s, pad to `rank`."""
    dtype = u.dtype
    u = u / u.norm(dim=-2, keepdim=True).clamp(min=1e-30)  # undo float rounding of the implicit Q
    v = v / v.norm(dim=-2, keepdim=True).clamp(min=1e-30)
    s = torch.where(positive, s, torch.zeros_like(s)).to(dtype)
    u, v = u.masked_fill(~positive[..., None, :], 0.0), v.masked_fill(~positive[..., None, :], 0.0)
    signs = torch.sign(u.gather(-2, u.abs().argmax(dim=-2, keepdim=True)))  # (..., 1, keep)
    signs[signs == 0] = 1.0
    root = s[..., None, :].sqrt() * signs
    u, v = u * root, v * root
    keep = s.shape[-1]
    if keep < rank:  # the LoRA has lower rank than asked: pad with zero components
        pad = rank - keep
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], pad)], dim=-1)
        v = torch.cat([v, v.new_zeros(*v.shape[:-1], pad)], dim=-1)
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], pad)], dim=-1)
    return u, v, s


def _canonical_module(u: torch.Tensor, v: torch.Tensor, like: LoRAModule) -> LoRAModule:
    """Factors `u` (out, k), `v` (in·kh·kw, k) as a scale-1 module shaped like `like` (conv shapes kept)."""
    rank = u.shape[-1]
    kernel = like.kernel_size
    if kernel:  # conv: down (k, in, kh, kw), up (out, k, 1, 1)
        down = v.T.reshape(rank, like.down.shape[1], *kernel)
        up = u.reshape(u.shape[0], rank, 1, 1)
    else:
        down, up = v.T, u
    return LoRAModule(down=down.contiguous(), up=up.contiguous(), alpha=None)


def reduce_module(module: LoRAModule, rank: int = 1, method: str = "gram") -> LoRAModule:
    """The best rank-`rank` approximation of one module, as canonical factors with scale 1 (conv shapes kept)."""
    u, v, _ = top_singular_factors(module.up_2d(), module.down_2d(), module.scale, rank, method)
    return _canonical_module(u, v, module)


def reduce_rank(lora: LoRA, rank: int = 1, method: str = "gram") -> LoRA:
    """Replace every module of `lora` by its top-`rank` singular components (computed from the factors).

    Modules with identical factor shapes share one batched r×r factorization.

    Example:
        ```python
        >>> from imagegem_hf.w2w import load_lora
        >>> from imagegem_hf.w2w.reduce import reduce_rank
        >>> lora4 = reduce_rank(load_lora("civitai_lora.safetensors"), rank=4)  # doctest: +SKIP
        ```
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}.")
    groups: dict[tuple, list[str]] = {}
    for name, module in lora.modules.items():
        groups.setdefault((module.out_features, module.in_features, module.rank), []).append(name)
    modules = {}
    for names in groups.values():
        batch = [lora.modules[n] for n in names]
        scales = torch.tensor([m.scale for m in batch], dtype=torch.float64)
        if method == "gram":  # only the r×r Gram matrices are stacked; the factors are never copied
            ups, downs = [m.up_2d() for m in batch], [m.down_2d() for m in batch]
            gram_up = torch.stack([a.mT @ a for a in ups]).double()
            gram_down = torch.stack([b @ b.mT for b in downs]).double()
            x_up, x_down, s, positive = _core_top(gram_up, gram_down, scales, rank)
            u = torch.stack([a @ x_up[i].to(a.dtype) for i, a in enumerate(ups)])
            v = torch.stack([b.mT @ x_down[i].to(b.dtype) for i, b in enumerate(downs)])
            u, v, _ = _finish(u, v, s, positive, rank)
        else:
            ups = torch.stack([m.up_2d() for m in batch])
            downs = torch.stack([m.down_2d() for m in batch])
            u, v, _ = top_singular_factors(ups, downs, scales, rank, method)
        for i, name in enumerate(names):
            modules[name] = _canonical_module(u[i], v[i], batch[i])
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
    if layers not in LAYER_GROUPS:
        raise ValueError(f"Unknown layer group {layers!r}; choose from {sorted(LAYER_GROUPS)}.")
    suffixes = LAYER_GROUPS[layers]
    modules = {name: m for name, m in lora.modules.items() if name.startswith("unet.") and name.endswith(suffixes)}
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
