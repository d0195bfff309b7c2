"""model/: shapes, TorchScript parity, parameter budget, argument checks."""

from __future__ import annotations

import pytest
import torch

from model import FashionCNN, count_parameters

CONFIGS = [dict(width=32, depth=2), dict(width=8, depth=1), dict(width=48, depth=3, dropout=0.3)]


@pytest.mark.parametrize("kw", CONFIGS)
def test_output_shape(kw: dict) -> None:
    out = FashionCNN(**kw).eval()(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert not torch.isnan(out).any(), "output included NaNs"


@pytest.mark.parametrize("kw", CONFIGS)
def test_scripted_equals_eager(kw: dict) -> None:
    torch.manual_seed(0)
    model = FashionCNN(**kw).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize(
    "kw, bound",
    [(dict(width=32, depth=2), 500_000), (dict(width=48, depth=3), 1_000_000)],
)
def test_parameter_count_within_bound(kw: dict, bound: int) -> None:
    """The default must stay small: it is chosen for accuracy per CPU-minute."""
    assert count_parameters(FashionCNN(**kw)) <= bound


@pytest.mark.parametrize("kw", [dict(depth=0), dict(width=0), dict(hidden=0), dict(dropout=1.0)])
def test_invalid_arguments_are_rejected(kw: dict) -> None:
    with pytest.raises(ValueError):
        FashionCNN(**kw)


def test_deep_config_stays_valid_on_28x28() -> None:
    assert FashionCNN(width=4, depth=5).eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
