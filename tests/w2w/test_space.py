"""WeightSpace: streaming dual PCA equals a dense PCA; exact round trip at m = N − 1; Hub-shaped save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagegem_hf.w2w import LoRA, LoRAModule, WeightSpace, load_lora, rank1_reduce, save_lora

SHAPES = {
    "unet.a.attn1.to_q": (12, 10, ()),
    "unet.a.attn2.to_v": (12, 6, ()),
    "unet.a.ff.net.2": (10, 20, ()),
    "unet.b.conv1": (4, 4, (3, 3)),
}


def _random_lora(seed: int, rank: int = 4, drop: str | None = None) -> LoRA:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (n_out, n_in, kernel) in SHAPES.items():
        if name == drop:
            continue
        down = torch.randn((rank, n_in, *kernel), generator=generator)
        up = torch.randn((n_out, rank, *([1] * len(kernel))), generator=generator)
        modules[name] = LoRAModule(down=down, up=up, alpha=float(rank))
    return LoRA(modules)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    paths = []
    for i in range(8):
        lora = _random_lora(i, rank=2 + i % 3, drop="unet.a.ff.net.2" if i in (2, 5) else None)
        paths.append(save_lora(lora, folder / f"lora_{i}.safetensors", format="kohya" if i % 2 else "diffusers"))
    return paths


def _dense_vectors(paths, space):
    """The data matrix written out independently: rank-1 factors per module, down then up, zeros if missing."""
    from imagegem_hf.w2w import load_lora

    rows = []
    for path in paths:
        reduced = rank1_reduce(load_lora(path))
        parts = []
        for name in sorted(SHAPES):
            n_out, n_in, _ = SHAPES[name]
            module = reduced.modules.get(name)
            if module is None:
                parts += [np.zeros(n_in + n_out, np.float32)]
            else:
                parts += [module.down.reshape(-1).numpy(), module.up.reshape(-1).numpy()]
        rows.append(np.concatenate(parts))
    x = np.stack(rows)
    if space.config.aligned_signs:
        x = _aligned(x, space)
    return x


def _aligned(x: np.ndarray, space: WeightSpace, passes: int = 2) -> np.ndarray:
    """Rank-1 rows with each module's factors flipped to point along the axis of 2 power iterations from their sum
    (dense numpy, module by module); the axis is checked against the space's `sign_reference`."""
    x = x.astype(np.float64).copy()
    for _, n_out, n_in, _, offset in space.layout:
        block = x[:, offset : offset + n_in + n_out]  # a view: down then up of one rank-1 module
        axis = block.sum(axis=0)
        for _ in range(passes - 1):
            axis = block.T @ (block @ (axis / np.linalg.norm(axis)))
        axis /= np.linalg.norm(axis)
        np.testing.assert_allclose(space.sign_reference.numpy()[offset : offset + n_in + n_out], axis, atol=1e-5)
        block *= np.where(block @ axis < 0, -1.0, 1.0)[:, None]
    return x.astype(np.float32)


@pytest.mark.parametrize("align_signs", [False, True])
@pytest.mark.parametrize("block_bytes", [64, 2**20], ids=["disk", "memory"])
def test_streaming_dual_pca_matches_dense_pca(lora_files, tmp_path, align_signs, block_bytes):
    n = len(lora_files)
    space = WeightSpace.build(
        lora_files,
        n_components=n - 1,
        cache_dir=tmp_path,
        block_bytes=block_bytes,
        show_progress=False,
        align_signs=align_signs,
    )
    assert space.config.module_names == sorted(SHAPES)
    assert space.config.missing_counts == [0, 0, 2, 0]  # ff.net.2 missing in two LoRAs, zero-filled
    assert len(space.config.kernel_sizes[3]) == 2 and space.config.base == "unknown"

    x = _dense_vectors(lora_files, space)
    assert x.shape == (n, space.vector_length)
    mean, std = x.mean(0), x.std(0)
    np.testing.assert_allclose(space.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(space.std.numpy(), std, rtol=1e-4, atol=1e-6)
    z = (x - mean) / std
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    np.testing.assert_allclose(space.explained_variance.numpy(), s[: n - 1] ** 2 / (n - 1), rtol=1e-3)
    np.testing.assert_allclose(space.config.total_variance, (z**2).sum() / (n - 1), rtol=1e-5)
    np.testing.assert_allclose(space.explained_variance_ratio().sum(), 1.0, rtol=1e-4)  # m = N − 1: all of it
    for k in range(n - 1):
        cosine = abs(float(space.components[k].numpy() @ vt[k]))
        assert cosine > 0.999
    # exact round trip at m = N − 1, from files and from the stored training coefficients
    coefficients = space.project(list(lora_files))
    np.testing.assert_allclose(coefficients, space.coefficients.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(space.unproject(coefficients), x, rtol=1e-3, atol=1e-4)


def test_reconstruction_error_decreases_with_m(lora_files, tmp_path):
    x = None
    errors = []
    for m in range(1, len(lora_files)):
        space = WeightSpace.build(lora_files, n_components=m, cache_dir=tmp_path, show_progress=False)
        x = _dense_vectors(lora_files, space) if x is None else x
        errors.append(float(np.linalg.norm(space.unproject(space.project(list(lora_files))) - x)))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-3 * errors[0]


def test_to_lora_gives_the_reduced_lora(lora_files):
    space = WeightSpace.build(lora_files, n_components=len(lora_files) - 1, show_progress=False)
    from imagegem_hf.w2w import load_lora

    lora = space.to_lora(space.coefficients[3].numpy())
    original = rank1_reduce(load_lora(lora_files[3]))
    for name, module in original.modules.items():
        torch.testing.assert_close(lora.modules[name].delta_weight(), module.delta_weight(), atol=1e-3, rtol=1e-3)
    assert lora.modules["unet.b.conv1"].down.shape == (1, 4, 3, 3)


def test_save_and_load_round_trip(lora_files, tmp_path):
    space = WeightSpace.build(lora_files, n_components=3, show_progress=False)
    space.save_pretrained(tmp_path / "space")
    assert {p.name for p in (tmp_path / "space").iterdir()} == {
        ".imagegem_hf",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "README.md",
        "explained_variance.png",
        *("space.py", "lora_io.py", "reduce.py", "vectorize.py"),  # its code, for loading without imagegem_hf
    }
    card = (tmp_path / "space" / "README.md").read_text()
    explained = 100 * space.explained_variance_ratio().sum()
    assert "W2W LoRA weight space" in card and f"3 components: {explained:.1f}% of the total" in card
    assert 0 < explained < 100  # 3 of the 7 components of 8 LoRAs
    with Image.open(tmp_path / "space" / "explained_variance.png") as figure:
        assert figure.size == (720, 420)
    loaded = WeightSpace.from_pretrained(tmp_path / "space")
    assert loaded.config.module_names == space.config.module_names
    assert loaded.config.model_ids == [f"lora_{i}" for i in range(8)]
    for name in ("mean", "std", "components", "explained_variance", "coefficients"):
        torch.testing.assert_close(getattr(loaded, name), getattr(space, name))
    np.testing.assert_allclose(loaded.project(lora_files[0]), space.project(lora_files[0]), rtol=1e-6)


def test_push_to_hub_uploads_a_folder_that_loads_back(lora_files, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    from imagegem_hf.hub import HubUnavailableError

    calls = []

    class FakeHub:  # records the calls; "uploads" by copying the folder
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls.append(("create", repo_id, repo_type, private, exist_ok, self.token))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message, ignore_patterns=()):
            shutil.copytree(folder_path, tmp_path / "hub" / repo_id, ignore=shutil.ignore_patterns(*ignore_patterns))
            return huggingface_hub.CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/1",
                commit_message=commit_message,
                commit_description="",
                oid="1",
            )

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    space = WeightSpace.build(lora_files, n_components=3, show_progress=False)
    url = space.push_to_hub("me/space", private=True, token="t")
    assert url == "https://huggingface.co/me/space/commit/1"
    assert calls == [("create", "me/space", "model", True, True, "t")]
    loaded = WeightSpace.from_pretrained(tmp_path / "hub" / "me/space")
    torch.testing.assert_close(loaded.components, space.components)
    assert "W2W LoRA weight space" in (tmp_path / "hub" / "me/space" / "README.md").read_text()

    def unreachable(self, **_):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(FakeHub, "upload_folder", unreachable)
    with pytest.raises(HubUnavailableError, match="unreachable"):
        space.push_to_hub("me/space")


def test_build_from_vectors_and_explicit_layout():
    rng = np.random.default_rng(0)
    space0 = WeightSpace.build([_random_lora(i) for i in range(4)], n_components=2, show_progress=False)
    vectors = rng.normal(size=(6, space0.vector_length)).astype(np.float32)
    layout = {name: (n_out, n_in, kernel) for name, n_out, n_in, kernel, _ in space0.layout}
    assert layout["unet.b.conv1"] == (4, 36, (3, 3))  # in_features of a conv = in_channels · kh · kw
    space = WeightSpace.build(list(vectors), n_components=5, modules=layout, show_progress=False)
    np.testing.assert_allclose(space.unproject(space.project(vectors)), vectors, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="needs `modules`"):
        WeightSpace.build(list(vectors), n_components=2, show_progress=False)


def test_bad_inputs(lora_files):
    with pytest.raises(ValueError, match="N − 1"):
        WeightSpace.build(lora_files[:3], n_components=3, show_progress=False)
    with pytest.raises(ValueError, match="model_ids"):
        WeightSpace.build(lora_files[:3], n_components=2, model_ids=["a"], show_progress=False)
    space = WeightSpace.build(lora_files, n_components=2, show_progress=False)
    wrong = LoRA({"unet.a.attn1.to_q": LoRAModule(down=torch.randn(2, 11), up=torch.randn(12, 2))})
    with pytest.raises(ValueError, match="Architecture mismatch"):
        space.project(wrong)
    with pytest.raises(ValueError, match="Architecture mismatch"):
        WeightSpace.build([*lora_files[:3], wrong], n_components=2, show_progress=False)
    with pytest.raises(ValueError, match="coefficients"):
        space.unproject(np.zeros(5))


def test_float16_cache_gives_the_same_space_up_to_rounding(lora_files):
    full = WeightSpace.build(lora_files, n_components=3, show_progress=False)
    half = WeightSpace.build(lora_files, n_components=3, cache_dtype="float16", show_progress=False)
    np.testing.assert_allclose(half.explained_variance.numpy(), full.explained_variance.numpy(), rtol=1e-2)
    cosines = np.abs(np.sum(half.components.numpy() * full.components.numpy(), axis=1))
    assert np.all(cosines > 0.999)
    with pytest.raises(ValueError, match="cache_dtype"):
        WeightSpace.build(lora_files, n_components=3, cache_dtype="int8", show_progress=False)


def test_parallel_reduction_keeps_the_input_order(lora_files, tmp_path):
    serial = WeightSpace.build(lora_files, n_components=3, num_workers=1, show_progress=False)
    parallel = WeightSpace.build(lora_files, n_components=3, num_workers=3, show_progress=False)
    assert parallel.config.model_ids == serial.config.model_ids
    torch.testing.assert_close(parallel.coefficients, serial.coefficients)
    torch.testing.assert_close(parallel.components, serial.components)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(lora_files[0].read_bytes()[:100])  # truncated: the worker's error reaches the caller
    with pytest.raises(ValueError):
        WeightSpace.build([*lora_files, broken], n_components=3, num_workers=2, show_progress=False)
    with pytest.raises(ValueError, match="num_workers"):
        WeightSpace.build(lora_files, n_components=3, num_workers=0, show_progress=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    ("block_bytes", "flush_bytes", "in_memory"),
    [(2**20, 2**20, True), (400, 2**20, False), (400, 250, False)],  # in memory; on disk; on disk in several flushes
)
def test_block_cache_statistics_gram_and_components_match_dense(tmp_path, dtype, block_bytes, flush_bytes, in_memory):
    from imagegem_hf.w2w.space import _BlockCache

    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((7, 23)) * rng.uniform(0.5, 3, 23) + rng.standard_normal(23)).astype(np.float32)
    cache = _BlockCache(tmp_path, 7, 23, block_bytes, np.dtype(dtype), flush_bytes=flush_bytes)
    assert cache.in_memory == in_memory and (len(cache.bounds) > 1) != in_memory
    for row in rows:
        cache.append(row)
    cache.finish()
    stored = rows.astype(dtype).astype(np.float64)  # statistics are those of what is cached
    gram = cache.gram(standardize=True, show_progress=False)
    np.testing.assert_allclose(cache.mean, stored.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.std, stored.std(0), rtol=1e-6)
    z = (stored - stored.mean(0)) / stored.std(0)
    np.testing.assert_allclose(gram, z @ z.T, rtol=1e-5, atol=1e-4)
    weights = rng.standard_normal((7, 3))
    out = np.zeros((3, 23), dtype=np.float32)
    cache.components(weights, out, show_progress=False)
    np.testing.assert_allclose(out, weights.T @ z, rtol=1e-5, atol=1e-4)
    assert (not in_memory) == any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="Expected 8 LoRAs"):
        short = _BlockCache(tmp_path / "short", 8, 23, block_bytes, np.dtype(dtype), flush_bytes=flush_bytes)
        short.append(rows[0])
        short.finish()


@pytest.mark.parametrize("block_bytes", [2**20, 64])  # in memory; one coordinate per block on disk
def test_block_cache_standard_deviation_keeps_its_digits_when_the_mean_dwarfs_the_spread(tmp_path, block_bytes):
    from imagegem_hf.w2w.space import _BlockCache

    rows = (1e4 + 1e-2 * np.arange(-4, 5)[:, None] * np.array([1.0, 2.0])).astype(np.float32)  # 9 rows, 2 columns
    cache = _BlockCache(tmp_path, 9, 2, block_bytes, np.dtype("float32"))
    for row in rows:
        cache.append(row)
    cache.finish()
    cache.gram(standardize=True, show_progress=False)
    stored = rows.astype(np.float64)
    np.testing.assert_allclose(cache.std, stored.std(0), rtol=1e-9)
    one_pass = np.sqrt((stored**2).mean(0) - stored.mean(0) ** 2)  # running sums of x and x² lose these digits
    assert np.abs(one_pass / stored.std(0) - 1).max() > 1e-6


def test_layer_selection_keeps_only_the_chosen_layers(lora_files):
    ff = WeightSpace.build(lora_files, n_components=3, layers="ff", show_progress=False)
    assert ff.config.module_names == ["unet.a.ff.net.2"]
    both = WeightSpace.build(lora_files, n_components=3, layers="both", rank=2, show_progress=False)
    assert both.config.module_names == ["unet.a.attn2.to_v", "unet.a.ff.net.2"] and both.config.rank == 2
    with pytest.raises(ValueError, match="Unknown layer group"):
        WeightSpace.build(lora_files, n_components=3, layers="attn_k", show_progress=False)
    with pytest.raises(ValueError, match="None of the 1 modules of the LoRAs is a ff layer"):
        WeightSpace.build(lora_files, n_components=3, modules={"unet.a.attn1.to_q": (12, 10, ())}, layers="ff")


def test_aligned_signs_keep_nearly_equal_loras_together(tmp_path):
    # Rank-1 LoRAs that differ by a little noise: the largest entry of `up` is one of two of nearly equal size and
    # opposite sign, so the reduction's sign rule alone puts some of them at −θ, on the other side of the space.
    rng = np.random.default_rng(0)
    n_out, n_in = 12, 10
    common_up, common_down = rng.normal(size=n_out), rng.normal(size=n_in)
    common_up[:2] = [3.0, -3.0]
    loras = []
    for _ in range(12):
        up = common_up + 0.05 * rng.normal(size=n_out)
        down = common_down + 0.05 * rng.normal(size=n_in)
        module = LoRAModule(down=torch.tensor(down[None], dtype=torch.float32), up=torch.tensor(up[:, None]).float())
        loras.append(LoRA({"unet.a.attn1.to_q": module}))
    cosines = {}
    for align in (False, True):
        space = WeightSpace.build(loras, n_components=3, show_progress=False, align_signs=align)
        x = np.stack([space.vectorize(lora)[0] for lora in loras]).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cosines[align] = x @ x.T
        assert space.config.aligned_signs is align
        space.save_pretrained(tmp_path / str(align))
        loaded = WeightSpace.from_pretrained(tmp_path / str(align))
        np.testing.assert_array_equal(loaded.project(loras), space.project(loras))
    assert cosines[False].min() < -0.9  # the sign rule split them
    assert cosines[True].min() > 0.9  # one side of the space, as their ΔW are


@pytest.mark.parametrize("block_bytes", [64, 2**20], ids=["disk", "memory"])
def test_aligned_signs_at_rank_2_match_a_dense_computation(lora_files, tmp_path, block_bytes):
    kwargs = {"cache_dir": tmp_path, "block_bytes": block_bytes, "show_progress": False}
    plain = WeightSpace.build(lora_files, n_components=4, rank=2, **kwargs)
    space = WeightSpace.build(lora_files, n_components=4, rank=2, align_signs=True, **kwargs)
    x = np.stack([plain.vectorize(load_lora(f))[0] for f in lora_files]).astype(np.float64)
    reference = space.sign_reference.numpy()
    aligned = [space.vectorize(load_lora(f))[0] for f in lora_files]
    for _, n_out, n_in, _, offset in space.layout:
        down = x[:, offset : offset + 2 * n_in].reshape(-1, 2, n_in)
        up = x[:, offset + 2 * n_in : offset + 2 * (n_in + n_out)].reshape(-1, n_out, 2)
        ref_down = reference[offset : offset + 2 * n_in].reshape(2, n_in)
        ref_up = reference[offset + 2 * n_in : offset + 2 * (n_in + n_out)].reshape(n_out, 2)
        for j in range(2):  # component j: down row j and up column j, two power iterations from their sum
            block = np.concatenate([down[:, j], up[:, :, j]], axis=1)
            axis = block.sum(axis=0)
            axis = block.T @ (block @ (axis / np.linalg.norm(axis)))
            axis /= np.linalg.norm(axis)
            np.testing.assert_allclose(np.r_[ref_down[j], ref_up[:, j]], axis, atol=1e-5)
            signs = np.where(block @ axis < 0, -1.0, 1.0)
            got = np.stack(
                [
                    np.r_[
                        v[offset + j * n_in : offset + (j + 1) * n_in],
                        v[offset + 2 * n_in : offset + 2 * (n_in + n_out)].reshape(n_out, 2)[:, j],
                    ]
                    for v in aligned
                ]
            )
            np.testing.assert_allclose(got, block * signs[:, None], rtol=1e-5, atol=1e-6)
