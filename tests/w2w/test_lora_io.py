"""LoRA I/O: kohya, diffusers and peft files of the same LoRA read identically; bad inputs fail clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from imagegem_hf.testing import tiny_sd_components
from imagegem_hf.w2w import LoRA, LoRAModule, load_lora, save_lora
from imagegem_hf.w2w.lora_io import read_lora_header, read_lora_shapes

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def peft_lora():
    """A LoRA trained-shaped by peft itself on the tiny UNet (lora_B randomised so ΔW ≠ 0)."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = tiny_sd_components(seed=0)["unet"]
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    state_dict = get_peft_model_state_dict(unet)
    return config, {k: v.detach().clone() for k, v in state_dict.items()}


def _truth(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW per module written out from the peft factors: (alpha / r) · B · A on the flattened layer."""
    out = {}
    for key, a in state_dict.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            b = state_dict[f"{module}.lora_B.weight"]
            out[f"unet.{module}"] = (ALPHA / RANK) * b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    return out


def _kohya_state_dict(state_dict, dtype=torch.float32):
    kohya = {}
    for key, value in state_dict.items():
        module, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.to(dtype)
        kohya[f"{name}.alpha"] = torch.tensor(ALPHA)
    return kohya


def _assert_matches(lora: LoRA, truth: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert sorted(lora.modules) == sorted(truth)
    for name, delta in truth.items():
        torch.testing.assert_close(lora.modules[name].delta_weight(), delta, atol=atol, rtol=1e-4)


def test_kohya_diffusers_and_peft_files_read_identically(peft_lora, tmp_path):
    from diffusers import StableDiffusionPipeline

    config, state_dict = peft_lora
    truth = _truth(state_dict)
    assert any(t.endswith("conv1") for t in truth) and any(t.endswith("to_out.0") for t in truth)

    # peft: adapter folder written by peft's own config class
    peft_dir = tmp_path / "peft"
    config.save_pretrained(peft_dir)
    save_file({f"base_model.model.{k}": v for k, v in state_dict.items()}, peft_dir / "adapter_model.safetensors")
    # diffusers: written by diffusers, alphas in the adapter metadata
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "diffusers", unet_lora_layers=state_dict, unet_lora_adapter_metadata=config.to_dict()
    )
    # kohya: renamed by hand, fp16 like most Civitai files
    save_file(_kohya_state_dict(state_dict, torch.float16), tmp_path / "kohya.safetensors")

    from_peft = load_lora(peft_dir)
    from_diffusers = load_lora(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    from_kohya = load_lora(tmp_path / "kohya.safetensors")
    assert (from_peft.source_format, from_diffusers.source_format, from_kohya.source_format) == (
        "peft",
        "diffusers",
        "kohya",
    )
    _assert_matches(from_peft, truth)
    _assert_matches(from_diffusers, truth)
    _assert_matches(from_kohya, truth, atol=5e-2)  # fp16 storage
    conv = next(n for n in truth if n.endswith("conv1"))
    assert from_kohya.modules[conv].kernel_size == (3, 3)


def test_bf16_kohya_file_is_upcast(peft_lora, tmp_path):
    _, state_dict = peft_lora
    save_file(_kohya_state_dict(state_dict, torch.bfloat16), tmp_path / "bf16.safetensors")
    lora = load_lora(tmp_path / "bf16.safetensors")
    assert all(m.down.dtype == torch.float32 for m in lora.modules.values())
    _assert_matches(lora, _truth(state_dict), atol=0.3)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_save_then_load_keeps_delta_weight(peft_lora, tmp_path, fmt):
    _, state_dict = peft_lora
    save_file(_kohya_state_dict(state_dict), tmp_path / "in.safetensors")
    lora = load_lora(tmp_path / "in.safetensors")
    path = save_lora(lora, tmp_path / f"out_{fmt}.safetensors", format=fmt)
    _assert_matches(load_lora(path), _truth(state_dict))


def test_header_only_shapes_match_full_read(peft_lora, tmp_path):
    _, state_dict = peft_lora
    save_file(_kohya_state_dict(state_dict), tmp_path / "k.safetensors")
    lora = load_lora(tmp_path / "k.safetensors")
    shapes = read_lora_shapes(tmp_path / "k.safetensors")
    assert shapes == {n: (m.out_features, m.in_features, m.kernel_size) for n, m in lora.modules.items()}


def _write(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["lora_unet_a_b.hada_w1_a", "lora_unet_a_b.hada_w1_b"], "LoHa"),
        (["lora_unet_a_b.lokr_w1", "lora_unet_a_b.lokr_w2"], "LoKr"),
        (["lora_unet_a_b.lora_down.weight", "lora_unet_a_b.lora_up.weight", "lora_unet_a_b.lora_mid.weight"], "LoCon"),
        (["lora_unet_a_b.lora_down.weight", "lora_unet_a_b.lora_up.weight", "lora_unet_a_b.dora_scale"], "DoRA"),
        (["unet.a.lora_A.weight", "unet.a.lora_B.weight", "unet.a.lora_magnitude_vector"], "DoRA"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"], "full model"),
        (["conv_in.weight", "down_blocks.0.resnets.0.norm1.weight"], "full model"),
        (["emb_params"], "no LoRA weights"),
    ],
)
def test_unsupported_formats_are_rejected(tmp_path, keys, message):
    path = _write(tmp_path, "bad.safetensors", {k: torch.zeros(2, 2) for k in keys})
    with pytest.raises(ValueError, match=message):
        load_lora(path)


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, ckpt)
    with pytest.raises(ValueError, match="pickle"):
        load_lora(ckpt)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(ckpt.read_bytes())
    with pytest.raises(ValueError, match="pickled"):
        load_lora(disguised)


def test_truncated_file_is_reported(peft_lora, tmp_path):
    _, state_dict = peft_lora
    path = _write(tmp_path, "full.safetensors", _kohya_state_dict(state_dict))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_lora(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_lora(garbage)


def test_architecture_mismatch_is_rejected(tmp_path):
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    sd15 = LoRA({name: LoRAModule(down=torch.randn(2, 768), up=torch.randn(320, 2))})
    assert sd15.base == "sd15"
    path = save_lora(sd15, tmp_path / "sd15.safetensors")
    assert load_lora(path, base="sd15").base == "sd15"
    with pytest.raises(ValueError, match="architecture mismatch"):
        load_lora(path, base="sdxl")


def test_missing_file_and_peft_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_lora(tmp_path / "nope.safetensors")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(tmp_path / "adapter")


def test_peft_alpha_pattern_and_rslora(tmp_path):
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(
        {f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b},
        folder / "adapter_model.safetensors",
    )
    config = {"r": 4, "lora_alpha": 4, "alpha_pattern": {"attn1.to_q": 16}, "use_rslora": True}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    lora = load_lora(folder)
    torch.testing.assert_close(lora.modules[f"unet.{module}"].delta_weight(), 16 / 2 * b @ a)


def test_kohya_sdxl_sgm_names_and_text_encoders_map_to_diffusers_names(tmp_path):
    """kohya trains SDXL on the SGM UNet (input_blocks / middle_block / output_blocks) and names both encoders."""
    expected = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        ),
        "input_blocks_8_1_transformer_blocks_9_attn2_to_k": (
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"
        ),
        "middle_block_1_transformer_blocks_3_ff_net_0_proj": (
            "mid_block.attentions.0.transformer_blocks.3.ff.net.0.proj"
        ),
        "output_blocks_2_1_transformer_blocks_1_attn2_to_out_0": (
            "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_out.0"
        ),
        "output_blocks_5_1_proj_in": "up_blocks.1.attentions.2.proj_in",
    }
    tensors = {}
    for kohya in expected:
        n_in = 2048 if kohya.endswith("attn2_to_k") else 64
        tensors[f"lora_unet_{kohya}.lora_down.weight"] = torch.randn(4, n_in)
        tensors[f"lora_unet_{kohya}.lora_up.weight"] = torch.randn(8, 4)
        tensors[f"lora_unet_{kohya}.alpha"] = torch.tensor(2.0)
    for prefix, module in (("lora_te1_", "mlp_fc1"), ("lora_te2_", "self_attn_q_proj")):
        tensors[f"{prefix}text_model_encoder_layers_0_{module}.lora_down.weight"] = torch.randn(4, 16)
        tensors[f"{prefix}text_model_encoder_layers_0_{module}.lora_up.weight"] = torch.randn(16, 4)
    lora = load_lora(_write(tmp_path, "sdxl.safetensors", tensors), base="sdxl")
    assert lora.base == "sdxl"
    assert sorted(lora.modules) == sorted(
        [f"unet.{name}" for name in expected.values()]
        + [
            "text_encoder.text_model.encoder.layers.0.mlp.fc1",
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
        ]
    )
    for kohya, name in expected.items():
        module = lora.modules[f"unet.{name}"]
        assert module.alpha == 2.0
        torch.testing.assert_close(module.down, tensors[f"lora_unet_{kohya}.lora_down.weight"])
    with pytest.raises(ValueError, match="architecture mismatch"):
        load_lora(tmp_path / "sdxl.safetensors", base="sd15")
    # the header-only path (no tensor created) agrees, and checks the base the same way
    base, shapes = read_lora_header(tmp_path / "sdxl.safetensors")
    assert base == "sdxl" and shapes == {
        n: (m.out_features, m.in_features, m.kernel_size) for n, m in lora.modules.items()
    }
    with pytest.raises(ValueError, match="architecture mismatch"):
        read_lora_header(tmp_path / "sdxl.safetensors", base="sd15")


def _raw_file(path, header, data: bytes, header_bytes: bytes | None = None):
    raw = json.dumps(header).encode() if header_bytes is None else header_bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(begin, end, shape):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


DOWN, UP = (
    "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
    "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight",
)


@pytest.mark.parametrize(
    ("name", "header", "data"),
    [
        ("overlapping", {DOWN: _entry(0, 8, [1, 2]), UP: _entry(4, 12, [2, 1])}, bytes(12)),
        ("hole", {DOWN: _entry(0, 8, [1, 2]), UP: _entry(12, 20, [2, 1])}, bytes(20)),
        ("trailing", {DOWN: _entry(0, 8, [1, 2]), UP: _entry(8, 16, [2, 1])}, bytes(24)),
        ("metadata_list", {"__metadata__": [], DOWN: _entry(0, 8, [1, 2]), UP: _entry(8, 16, [2, 1])}, bytes(16)),
    ],
)
def test_files_the_safetensors_library_refuses_are_refused_naming_the_file(tmp_path, name, header, data):
    path = _raw_file(tmp_path / f"{name}.safetensors", header, data)
    with pytest.raises(ValueError, match=f"{name}.safetensors is not a readable safetensors file"):
        load_lora(path)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_lora_header(path)


def test_duplicate_keys_huge_and_deeply_nested_headers_are_refused(tmp_path):
    # The second DOWN entry wins in a plain JSON parser, leaving bytes 0-8 unused: the library refuses the file.
    first, up, second = (
        json.dumps(_entry(*span, shape)) for span, shape in (((0, 8), [1, 2]), ((8, 16), [2, 1]), ((16, 24), [1, 2]))
    )
    duplicate = f'{{"{DOWN}": {first}, "{UP}": {up}, "{DOWN}": {second}}}'.encode()
    nested = ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    huge = json.dumps({DOWN: _entry(0, 8, [1, 2]), UP: _entry(8, 16, [2, 1])}).encode()
    huge += b" " * (100_000_008 - len(huge))  # 8 bytes over the library's limit of 100,000,000
    for name, raw in (("duplicate", duplicate), ("nested", nested), ("huge", huge)):
        path = _raw_file(
            tmp_path / f"{name}.safetensors", None, bytes(24 if name == "duplicate" else 16), header_bytes=raw
        )
        with pytest.raises(ValueError, match=f"{name}.safetensors is not a readable safetensors file"):
            load_lora(path)
        path.unlink()


def test_map_lora_keeps_the_file_dtype_and_reduces_like_load_lora(tmp_path):
    from imagegem_hf.w2w.lora_io import map_lora
    from imagegem_hf.w2w.reduce import reduced_factors

    generator = torch.Generator().manual_seed(1)
    modules = {
        f"unet.b{i}.attn1.to_q": LoRAModule(
            down=torch.randn(4, 24, generator=generator), up=torch.randn(16, 4, generator=generator), alpha=2.0
        )
        for i in range(3)
    }
    path = save_lora(LoRA(modules), tmp_path / "l.safetensors", format="kohya", dtype=torch.float16)
    mapped, loaded = map_lora(path), load_lora(path)
    assert {m.down.dtype for m in mapped.modules.values()} == {torch.float16}
    assert {m.down.dtype for m in loaded.modules.values()} == {torch.float32}
    for name, (u, vt) in reduced_factors(loaded).items():  # fp16 upcasts exactly: the same reduction
        assert torch.equal(reduced_factors(mapped)[name][0], u) and torch.equal(reduced_factors(mapped)[name][1], vt)
        assert mapped.modules[name].alpha == loaded.modules[name].alpha == 2.0


def test_down_up_rank_mismatch_names_the_file_and_module(tmp_path):
    stem = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    kohya = _write(
        tmp_path,
        "kohya.safetensors",
        {f"{stem}.lora_down.weight": torch.zeros(4, 16), f"{stem}.lora_up.weight": torch.zeros(16, 3)},
    )
    module = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    for read in (load_lora, read_lora_header):
        with pytest.raises(
            ValueError, match=rf"kohya.safetensors: module {module} has a down factor of shape \[4, 16\]"
        ):
            read(kohya)
    diffusers = _write(
        tmp_path,
        "diffusers.safetensors",
        {f"{module}.lora_A.weight": torch.zeros(4, 16), f"{module}.lora_B.weight": torch.zeros(16, 2)},
    )
    with pytest.raises(ValueError, match=f"diffusers.safetensors: module {module} .* ranks"):
        load_lora(diffusers)


def test_old_diffusers_attention_processor_keys_load_as_diffusers_loads_them(tmp_path):
    from imagegem_hf.testing import tiny_sd_pipeline
    from imagegem_hf.w2w.lora_io import lora_target_shapes

    pipe = tiny_sd_pipeline()
    shapes = lora_target_shapes(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"])
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for name, (n_out, n_in, _) in shapes.items():
        block, _, projection = name.removesuffix(".0").rpartition(".")  # to_out.0 is stored as to_out_lora
        state_dict[f"{block}.processor.{projection}_lora.down.weight"] = torch.randn(2, n_in, generator=generator)
        state_dict[f"{block}.processor.{projection}_lora.up.weight"] = torch.randn(n_out, 2, generator=generator)
    path = _write(tmp_path, "old_processor.safetensors", state_dict)
    lora = load_lora(path)
    pipe.load_lora_weights(str(path))  # what diffusers itself makes of the file
    layers = dict(pipe.unet.named_modules())
    assert sorted(lora.modules) == sorted(shapes)
    for name, module in lora.modules.items():
        layer = layers[name.removeprefix("unet.")]
        adapter = next(iter(layer.lora_A))
        torch.testing.assert_close(module.down, layer.lora_A[adapter].weight)
        torch.testing.assert_close(module.up * module.scale, layer.lora_B[adapter].weight * layer.scaling[adapter])


def test_save_lora_defaults_to_diffusers_because_diffusers_drops_kohya_text_encoder_attention(tmp_path):
    import inspect

    from imagegem_hf.testing import tiny_sd_pipeline
    from imagegem_hf.w2w.lora_io import lora_target_shapes

    assert inspect.signature(save_lora).parameters["format"].default == "diffusers"
    shapes = lora_target_shapes(tiny_sd_pipeline().text_encoder, ["q_proj", "v_proj", "fc1"], prefix="text_encoder")
    generator = torch.Generator().manual_seed(0)
    lora = LoRA(
        {
            n: LoRAModule(torch.randn(2, i, generator=generator), torch.randn(o, 2, generator=generator))
            for n, (o, i, _) in shapes.items()
        }
    )
    loaded = {}
    for fmt in ("diffusers", "kohya"):
        pipe = tiny_sd_pipeline()
        pipe.load_lora_weights(str(save_lora(lora, tmp_path / f"{fmt}.safetensors", format=fmt)))
        loaded[fmt] = {n for n, m in pipe.text_encoder.named_modules() if len(getattr(m, "lora_A", ()))}
    assert len(loaded["diffusers"]) == len(shapes) == 6
    assert {n.rsplit(".", 1)[1] for n in loaded["kohya"]} == {"fc1"}  # q_proj / v_proj edits are lost
