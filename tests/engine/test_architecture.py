"""The CDAE's own guarantees: any size, range compression, the saturation gate."""

from __future__ import annotations

import pytest
import torch

from cdae.engine.architecture import ArchitectureConfig, CDAE, pad_to_multiple

ARCH = ArchitectureConfig(base_width=4, depth=2, convs_per_level=1)


def test_compression_round_trip() -> None:
    net = CDAE(ARCH)
    x = torch.tensor([-50.0, -1.0, 0.0, 0.3, 1.0, 7.0, 300.0])
    torch.testing.assert_close(net.expand(net.compress(x)), x, rtol=1e-5, atol=1e-5)
    assert net.compress(torch.tensor(300.0)) < 7  # defects far above the scene come in compressed


@pytest.mark.parametrize("logit,unchanged", [(-30.0, True), (30.0, False)])
def test_saturated_pixels_change_only_where_the_defect_head_fires(logit: float, unchanged: bool) -> None:
    torch.manual_seed(0)
    net = CDAE(ARCH).eval()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-0.5, logit]))  # correction −0.5 everywhere, fixed defect logit
    x = torch.rand(1, 2, 16, 16)
    x[:, 1] = 0.0
    x[0, 1, 4, 5] = 1.0  # one saturated pixel
    with torch.no_grad():
        restored, _ = net(x)
    sat_changed = not torch.isclose(restored[0, 0, 4, 5], x[0, 0, 4, 5], atol=1e-5)
    assert sat_changed != unchanged
    # unsaturated pixels are always restored (here: the fixed correction applies)
    assert not torch.isclose(restored[0, 0, 0, 0], x[0, 0, 0, 0], atol=1e-3)


def test_gate_off_changes_saturated_pixels_too() -> None:
    net = CDAE(ARCH.model_copy(update={"saturation_gate": False})).eval()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-0.5, -30.0]))
    x = torch.rand(1, 2, 8, 8)
    x[:, 1] = 1.0
    with torch.no_grad():
        restored, _ = net(x)
    assert not torch.allclose(restored, x[:, :1], atol=1e-3)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 17), (16, 16), (33, 8)])
def test_pad_to_multiple(h: int, w: int) -> None:
    x = torch.rand(1, 2, h, w)
    p, (oh, ow) = pad_to_multiple(x, 4)
    assert (oh, ow) == (h, w) and p.shape[-2] % 4 == 0 and p.shape[-1] % 4 == 0
    torch.testing.assert_close(p[..., :h, :w], x)
