import pytest
import torch

from imagegem_hf.toy.train import ToyTrainingConfig, train_toy_pipeline


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name in ("unet", "vae", "text_encoder")
        for key, value in getattr(pipe, name).state_dict().items()
    }


@pytest.mark.slow
def test_training_is_reproducible_bit_for_bit():
    config = ToyTrainingConfig(vae_steps=4, unet_steps=4, pool_size=128)
    first, losses_first = train_toy_pipeline(config)
    second, losses_second = train_toy_pipeline(config)
    assert losses_first == losses_second
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.vae.config.scaling_factor == second.vae.config.scaling_factor
    # and the seed matters
    third, _ = train_toy_pipeline(ToyTrainingConfig(vae_steps=4, unet_steps=4, pool_size=128, seed=1))
    assert not torch.equal(_weights(third)["unet.conv_in.weight"], a["unet.conv_in.weight"])


@pytest.mark.slow
def test_reporting_prompt_following_during_training_leaves_the_weights_alone(capsys):
    config = ToyTrainingConfig(vae_steps=2, unet_steps=3, pool_size=64)
    plain, _ = train_toy_pipeline(config)
    reported, _ = train_toy_pipeline(config, eval_every=1)
    assert capsys.readouterr().out.count("attribute accuracy") == 2  # after steps 1 and 2; the last is the caller's
    a, b = _weights(plain), _weights(reported)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("graded", [True, False])
def test_the_vae_learns_from_graded_renders(monkeypatch, graded):
    # Every VAE batch is graded image by image in a random colour grade (both axes uniform in [−1, 1]) unless
    # `vae_graded=False`; re-typed here from the grade's formula, with the renders of the same draws.
    import numpy as np

    import imagegem_hf.toy.train as train
    from imagegem_hf.toy.pipeline import toy_components
    from imagegem_hf.toy.world import render, sample_world

    seen = []
    vae = toy_components(seed=0)["vae"]
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: seen.append(pixels) or original(pixels))
    config = ToyTrainingConfig(vae_steps=2, batch_size=4, vae_graded=graded)
    train.train_vae(vae, config, torch.Generator().manual_seed(0))
    rendered = [render(spec) for spec in sample_world(4, seed=config.seed * 1_000_003 + 2)[0]]  # the second step
    plain = np.stack([np.asarray(image, dtype=np.float64) / 255.0 for image in rendered])
    shown = (seen[1].permute(0, 2, 3, 1).double().numpy() + 1.0) / 2.0
    if not graded:
        np.testing.assert_allclose(shown, plain, atol=1e-6)
        return
    warmth = shown[..., 0].mean(axis=(1, 2)) - shown[..., 2].mean(axis=(1, 2))
    assert np.abs(warmth - (plain[..., 0].mean(axis=(1, 2)) - plain[..., 2].mean(axis=(1, 2)))).max() > 0.02
    grades = np.random.default_rng([config.seed, 1]).uniform(-1.0, 1.0, size=(4, 2))
    for image, (w, b), out in zip(plain, grades, shown, strict=True):
        tinted = np.clip(image * np.array([1 + 0.4 * w, 1.0, 1 - 0.4 * w]), 0.0, 1.0)
        np.testing.assert_allclose(out, np.round(255 * tinted ** (2.0 ** (-0.7 * b))) / 255.0, atol=1e-6)


@pytest.mark.parametrize("flags, expected", [([], False), (["--no-vae-graded"], False), (["--vae-graded"], True)])
def test_the_training_cli_reads_switches_as_switches(monkeypatch, tmp_path, flags, expected):
    import imagegem_hf.toy.train as train

    seen = []
    monkeypatch.setattr(
        train,
        "train_toy_pipeline",
        lambda config, *a, **k: seen.append(config) or (None, {"vae": [0.0], "unet": [0.0]}),
    )
    assert train.main(["--output-dir", str(tmp_path), "--no-eval", "--vae-steps", "3", *flags]) == 0
    assert seen[0].vae_graded is expected and seen[0].vae_steps == 3
