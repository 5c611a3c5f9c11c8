"""rank1_reduce equals a dense SVD of ΔW (up to sign) for ranks 1–64, without forming ΔW."""

from __future__ import annotations

import pytest
import torch

from imagegem_hf.w2w import LoRA, LoRAModule, rank1_reduce, reduce_rank, select_layers
from imagegem_hf.w2w.reduce import top_singular_factors


def _random_module(out_features, in_features, rank, seed, kernel=()):
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, in_features, *kernel), generator=generator, dtype=torch.float64)
    up = torch.randn((out_features, rank, *([1] * len(kernel))), generator=generator, dtype=torch.float64)
    return LoRAModule(down=down, up=up, alpha=rank / 2)


@pytest.mark.parametrize("method", ["gram", "qr"])
@pytest.mark.parametrize("rank", [1, 2, 3, 8, 16, 32, 64])
@pytest.mark.parametrize(("out_features", "in_features", "kernel"), [(96, 80, ()), (40, 120, ()), (16, 4, (3, 3))])
def test_rank1_matches_dense_svd(rank, out_features, in_features, kernel, method):
    name = "unet.block.conv" if kernel else "unet.block.to_q"
    module = _random_module(out_features, in_features, rank, seed=rank, kernel=kernel)
    reduced = rank1_reduce(LoRA({name: module}), method=method).modules[name]
    assert reduced.rank == 1 and reduced.scale == 1.0
    assert reduced.down.shape[1:] == module.down.shape[1:] and reduced.up.shape[2:] == module.up.shape[2:]

    dense = module.scale * module.up.reshape(out_features, rank) @ module.down.reshape(rank, -1)
    u, s, vh = torch.linalg.svd(dense)
    u_ours = reduced.up.reshape(-1)
    v_ours = reduced.down.reshape(-1)
    # √s on each side
    torch.testing.assert_close(u_ours.norm() ** 2, s[0])
    torch.testing.assert_close(v_ours.norm() ** 2, s[0])
    # same singular vectors up to one shared sign, and the sign rule: largest-|.| entry of u positive
    sign = torch.sign(u[:, 0][u[:, 0].abs().argmax()])
    torch.testing.assert_close(u_ours / s[0].sqrt(), sign * u[:, 0])
    torch.testing.assert_close(v_ours / s[0].sqrt(), sign * vh[0])
    assert u_ours[u_ours.abs().argmax()] > 0
    torch.testing.assert_close(torch.outer(u_ours, v_ours), s[0] * torch.outer(u[:, 0], vh[0]))


def test_equal_delta_weights_give_equal_factors():
    """Two factorisations of the same ΔW (up·G, G⁻¹·down) reduce to the same vectors (the gauge is fixed)."""
    module = _random_module(30, 20, 5, seed=1)
    gauge = torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 3 * torch.eye(5)
    other = LoRAModule(down=torch.linalg.solve(gauge, module.down), up=-module.up @ gauge * -1, alpha=module.alpha)
    a = rank1_reduce(LoRA({"unet.x.to_q": module})).modules["unet.x.to_q"]
    b = rank1_reduce(LoRA({"unet.x.to_q": other})).modules["unet.x.to_q"]
    torch.testing.assert_close(a.up, b.up)
    torch.testing.assert_close(a.down, b.down)


def test_reduce_rank_is_the_best_low_rank_approximation_and_pads():
    module = _random_module(24, 18, 6, seed=3)
    dense = module.delta_weight()
    reduced = reduce_rank(LoRA({"unet.x.to_v": module}), rank=3).modules["unet.x.to_v"]
    u, s, vh = torch.linalg.svd(dense)
    torch.testing.assert_close(reduced.delta_weight(), (u[:, :3] * s[:3]) @ vh[:3])
    padded = reduce_rank(LoRA({"unet.x.to_v": module}), rank=8).modules["unet.x.to_v"]
    torch.testing.assert_close(padded.delta_weight(), dense)
    assert torch.all(padded.up[:, 6:] == 0)
    _, _, s_ours = top_singular_factors(module.up, module.down, module.scale, rank=8)
    torch.testing.assert_close(s_ours[:6], s[:6])


def test_select_layers_keeps_value_and_feed_forward_layers():
    names = ["unet.b.attn1.to_q", "unet.b.attn1.to_v", "unet.b.attn2.to_v", "unet.b.ff.net.0.proj", "unet.b.ff.net.2"]
    lora = LoRA({n: _random_module(8, 8, 4, seed=i) for i, n in enumerate(names)})
    assert sorted(select_layers(lora, "attn_v").modules) == ["unet.b.attn1.to_v", "unet.b.attn2.to_v"]
    assert sorted(select_layers(lora, "ff").modules) == ["unet.b.ff.net.0.proj", "unet.b.ff.net.2"]
    assert len(select_layers(lora, "both", rank=4).modules) == 4
    with pytest.raises(ValueError, match="rank-16"):
        select_layers(lora, "both", rank=16)
    with pytest.raises(ValueError, match="Unknown layer group"):
        select_layers(lora, "attn_k")


@pytest.mark.parametrize("method", ["gram", "qr"])
def test_float32_and_rank_deficient_factors(method):
    """fp32 factors as read from files, with a zero row in down (rank-deficient, as in padded LoRAs)."""
    module = _random_module(64, 48, 8, seed=7)
    module = LoRAModule(down=module.down.float(), up=module.up.float(), alpha=module.alpha)
    module.down[3] = 0
    reduced = rank1_reduce(LoRA({"unet.x.to_k": module}), method=method).modules["unet.x.to_k"]
    u, s, vh = torch.linalg.svd(module.delta_weight().double())
    torch.testing.assert_close(
        reduced.delta_weight().double(), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-4, rtol=1e-4
    )
    zero = LoRAModule(down=torch.zeros(4, 6), up=torch.randn(5, 4))
    assert torch.all(rank1_reduce(LoRA({"unet.z.to_v": zero}), method=method).modules["unet.z.to_v"].up == 0)
    with pytest.raises(ValueError, match="Unknown method"):
        top_singular_factors(module.up, module.down, method="svd")


def test_top_eigenpair_matches_eigh_and_survives_degenerate_matrices():
    from imagegem_hf.w2w.reduce import _top_eigenpair

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20, 16, 16, generator=generator, dtype=torch.float64)
    gram = a @ a.mT
    value, vector = _top_eigenpair(gram)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    torch.testing.assert_close(value, eigenvalues[:, -1])
    torch.testing.assert_close((vector * eigenvectors[:, :, -1]).sum(-1).abs(), torch.ones(20, dtype=torch.float64))
    special = torch.stack(
        [torch.zeros(4, 4), torch.diag(torch.tensor([1.0, 2.0, 2.0, 0.5])), 3 * torch.eye(4)]
    ).double()
    value, vector = _top_eigenpair(special)
    assert value.tolist() == [0.0, 2.0, 3.0]
    torch.testing.assert_close(vector.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    # Each vector is an eigenvector of its matrix for the top eigenvalue (any one, when it repeats).
    torch.testing.assert_close((special @ vector[..., None])[..., 0], value[:, None] * vector)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_factors_that_require_grad_or_are_half_reduce_like_float64(dtype):
    module = _random_module(40, 24, 6, seed=11)
    reference = rank1_reduce(LoRA({"unet.x.to_q": module})).modules["unet.x.to_q"]
    down, up = module.down.to(dtype), module.up.to(dtype)
    if dtype == torch.float32:
        down, up = down.requires_grad_(), up.requires_grad_()  # e.g. a LoRA being trained
    reduced = rank1_reduce(LoRA({"unet.x.to_q": LoRAModule(down=down, up=up, alpha=module.alpha)}))
    ours = reduced.modules["unet.x.to_q"]
    assert ours.up.dtype == torch.float32 and not ours.up.requires_grad
    tolerance = 2e-2 if dtype == torch.float16 else 1e-5  # fp16 rounds the factors themselves
    torch.testing.assert_close(ours.delta_weight().double(), reference.delta_weight(), rtol=tolerance, atol=tolerance)
