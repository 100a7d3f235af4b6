"""The fused oneDNN plan of the CDAE (``torch-cpu`` in BF16) computes the module's function.

In FP32 the plan and the module differ only by the order of a few sums (the decoder's split
convolution) and ``asinh`` from ``log1p``: tested on every CPU to 1e-4 in normalised units. In
BF16 (where the CPU has it natively) the plan's difference from the module under autocast is of the
size of BF16's own rounding, and both stay within the ``torch-bf16`` parity tolerance of FP32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cdae.deploy.export import measure_parity
from cdae.engine.architecture import ArchitectureConfig, CDAE, OutputAverage, build_model, pad_to_multiple
from cdae.engine.backends import TorchCPUBackend, cpu_bf16_native, load_backend
from cdae.engine.backends.cpu_fused import FusedCDAE, fast_asinh, fused_unsupported
from cdae.engine.config import BackendOptions
from cdae.engine.package import load_model

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "cdae-default" / "11"


def _frame_input(side: int, seed: int = 0) -> torch.Tensor:
    """A normalised frame (background, a bright disc, hot pixels far above) and its saturation channel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    f = 0.1 + 0.8 * ((yy - side / 2) ** 2 + (xx - side / 3) ** 2 < (side / 5) ** 2) + rng.normal(0, 0.01, (side, side))
    hot = rng.integers(0, side, (2, 20))
    f[hot[0], hot[1]] = 40.0
    sat = (f > 0.88).astype(np.float32)
    x = torch.from_numpy(np.stack([f, sat]).astype(np.float32))[None]
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", [
    ArchitectureConfig(base_width=8, depth=2, convs_per_level=1),
    ArchitectureConfig(base_width=6, depth=3, convs_per_level=2, activation="relu", compression_scale=0.5),
    ArchitectureConfig(base_width=8, depth=1, in_channels=1, defect_head=False, compression="none"),
])
def test_the_fp32_plan_is_the_module(arch: ArchitectureConfig) -> None:
    torch.manual_seed(0)
    model = build_model(arch).eval().to(memory_format=torch.channels_last)
    x, _ = pad_to_multiple(_frame_input(61)[:, : arch.in_channels], arch.multiple)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(x)
        got = FusedCDAE(model, torch.float32)(x)
        again = FusedCDAE(model, torch.float32)(x)
    for w, g, a in zip(want, got, again):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert float((g - w).abs().max()) < 1e-4
        assert torch.equal(g, a)  # the same bits each time


def test_the_plan_keeps_reordered_weights_per_shape_and_forgets_the_oldest() -> None:
    from cdae.engine.backends import cpu_fused

    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(base_width=4, depth=1, convs_per_level=1)).eval()
    plan = FusedCDAE(model, torch.float32)
    for side in range(8, 8 + 2 * (cpu_fused.MAX_PACKED_SHAPES + 3), 2):
        x = torch.zeros(1, 2, side, side).contiguous(memory_format=torch.channels_last)
        plan(x)
    assert len(plan.stem[0]._packed) == cpu_fused.MAX_PACKED_SHAPES
    with torch.inference_mode():
        x = _frame_input(16)
        assert float((plan(x)[0] - model(x)[0]).abs().max()) < 1e-4  # an evicted shape packs again


def test_fast_asinh_is_asinh_everywhere() -> None:
    v = torch.tensor([0.0, -0.0, 1e-30, 1e-7, 1e-3, -0.5, 1.0, 3.0, 1e4, -1e10, 1e17, 1e20, -3e38,
                      float("inf"), float("-inf"), float("nan")])
    got, want = fast_asinh(v), torch.asinh(v)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert torch.allclose(got, want, rtol=3e-7, atol=0, equal_nan=True)
    dense = torch.linspace(-50, 50, 200001)
    assert float(((fast_asinh(dense) - torch.asinh(dense)).abs() / torch.asinh(dense).abs().clamp(min=1e-30)).max()) < 5e-7


def test_what_the_plan_cannot_run_is_said() -> None:
    silu = build_model(ArchitectureConfig(base_width=4, depth=1, activation="silu"))
    assert "silu" in str(fused_unsupported(silu))
    pair = OutputAverage([CDAE(ArchitectureConfig(base_width=4, depth=1)) for _ in range(2)])
    assert "OutputAverage" in str(fused_unsupported(pair))
    with pytest.raises(ValueError, match="silu"):
        FusedCDAE(silu)  # type: ignore[arg-type]


@pytest.mark.skipif(not cpu_bf16_native(), reason="this CPU has no native BF16: torch-cpu keeps fp32")
def test_bf16_plan_is_as_close_to_fp32_as_autocast() -> None:
    manifest, model = load_model(DEFAULT)
    model = model.eval().to(memory_format=torch.channels_last)
    x = _frame_input(256)
    with torch.inference_mode():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x)
        fused = FusedCDAE(model)(x)
    err_auto = float((auto[0] - fp32[0]).abs().max())
    err_fused = float((fused[0] - fp32[0]).abs().max())
    rms_fused = float((fused[0] - fp32[0]).pow(2).mean().sqrt())
    rms_auto = float((auto[0] - fp32[0]).pow(2).mean().sqrt())
    # the same rounding as autocast's, not more: BF16 tensors between layers either way
    assert rms_fused < 1.5 * rms_auto and err_fused < 2 * err_auto + 1e-3, (err_fused, err_auto, rms_fused, rms_auto)
    assert float((torch.sigmoid(fused[1]) - torch.sigmoid(fp32[1])).abs().max()) < 0.05


@pytest.mark.skipif(not cpu_bf16_native(), reason="this CPU has no native BF16: torch-cpu keeps fp32")
def test_torch_cpu_runs_bf16_fused_unless_told_to_run_the_module() -> None:
    manifest, model = load_model(DEFAULT)
    fused = TorchCPUBackend(manifest, model, "bf16")
    assert fused.describe()["bf16_kernels"] == "fused" and fused.fused is not None
    module = load_backend("torch-cpu", DEFAULT, BackendOptions(precision="bf16", cpu_kernels="module"))
    assert module.describe()["bf16_kernels"] == "module"
    fp32 = load_backend("torch-cpu", DEFAULT, BackendOptions(precision="fp32"))
    assert fp32.describe()["bf16_kernels"] is None
    x = _frame_input(96)[0].numpy()
    a, pa = fused._run(x)
    b, pb = module._run(x)  # type: ignore[attr-defined]
    c, _ = fp32._run(x)  # type: ignore[attr-defined]
    assert a.shape == b.shape == c.shape == (96, 96)
    assert not np.array_equal(a, b)  # the plan really ran
    assert np.abs(pa - pb).max() < 0.05
    # the export's own check, in DN of real bit depths: the plan passes what autocast passes
    parity = measure_parity(fused, fp32, "bf16", frames=2)
    assert parity.passed, parity.as_record()


@pytest.mark.skipif(not cpu_bf16_native(), reason="this CPU has no native BF16: torch-cpu keeps fp32")
def test_narrow_frames_come_out_finite_in_bf16() -> None:
    """oneDNN's BF16 stride-2 convolution (AMX, torch 2.13) returns NaN, at random, where its output is one
    pixel wide: a frame up to the network's multiple wide reached a one-pixel bottleneck (710 NaN pixels of a
    130x8 frame, fused or autocast alike). torch-cpu pads such frames to two multiples; the output is finite and
    as close to FP32 as a wide frame's."""
    manifest, model = load_model(DEFAULT)
    fused = TorchCPUBackend(manifest, model, "bf16")
    module = TorchCPUBackend(*load_model(DEFAULT), "bf16", kernels="module")
    fp32 = TorchCPUBackend(*load_model(DEFAULT), "fp32")
    rng = np.random.default_rng(3)
    for h, w in ((130, 8), (136, 8), (8, 136), (2048, 4), (9, 9)):
        x = np.zeros((2, h, w), np.float32)
        x[0] = 0.2 + 0.6 * rng.random((h, w))
        # FP32 on the same padded frame: what the BF16 paths should approximate (their padding is theirs alone)
        padded, _ = fused._padded(torch.from_numpy(x)[None])
        assert min(padded.shape[-2:]) >= 2 * fused.multiple
        reference = fp32._run(padded[0].numpy())[0][:h, :w]
        for _ in range(3):  # the NaNs came at random
            for backend in (fused, module):
                restored, prob = backend._run(x)
                assert np.isfinite(restored).all() and np.isfinite(prob).all(), (h, w, backend.kernels)
                assert np.abs(restored - reference).max() < 0.1
