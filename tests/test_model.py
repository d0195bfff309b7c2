"""model/: shapes, TorchScript parity, parameter budget, argument checks."""

from __future__ import annotations

import pytest
import torch

from model import FashionCNN, count_parameters

CONFIGS = [
    dict(width=32, depth=2),
    dict(width=8, depth=1),
    dict(width=48, depth=3, dropout=0.3),
    dict(width=16, depth=2, stem_convs=1, flip_tta=True),
]


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


BAD = [dict(depth=0), dict(width=0), dict(hidden=0), dict(dropout=1.0)]
BAD += [dict(stem_convs=0), dict(stem_convs=3)]


@pytest.mark.parametrize("kw", BAD)
def test_invalid_arguments_are_rejected(kw: dict) -> None:
    with pytest.raises(ValueError):
        FashionCNN(**kw)


def test_deep_config_stays_valid_on_28x28() -> None:
    assert FashionCNN(width=4, depth=5).eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_stem_convs_drops_one_full_resolution_conv() -> None:
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in FashionCNN(stem_convs=n).modules()) for n in (1, 2)]
    assert convs == [3, 4]


def test_flip_tta_averages_image_and_mirror_in_eval_only() -> None:
    torch.manual_seed(0)
    tta = FashionCNN(width=8, depth=1, flip_tta=True).eval()
    plain = FashionCNN(width=8, depth=1).eval()
    plain.load_state_dict(tta.state_dict())
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(tta(x), (plain(x) + plain(x.flip(-1))) / 2)
    # A mirrored garment gets the same answer, and training sees one view per image.
    torch.testing.assert_close(tta(x.flip(-1)), tta(x))
    tta.train(), plain.train()
    torch.manual_seed(1)
    a = tta(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a, plain(x))
