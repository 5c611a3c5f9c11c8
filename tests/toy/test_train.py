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
