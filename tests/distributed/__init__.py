"""Multi-process tests and their workers; `assert_same_weights` is shared with the single-process training tests."""

import torch


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    """Same non-empty keys, and every tensor within `atol` of the expected one (no relative slack)."""
    assert got.keys() == expected.keys() and got
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol, msg=key)
