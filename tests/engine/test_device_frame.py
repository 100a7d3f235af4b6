"""The device path (``cdae.engine.device_frame``): the frame path's pre/post-processing in torch.

On the CPU it must give the NumPy path's numbers bit for bit: network input, offset and scale,
full well, noise model, guard output and flags, the denoised frame, residual and defect
probability. Frames are simulated (``cdae.training.defects``) at 8, 12 and 16 bits with every
defect class (saturated blobs and blooms, hot and dead pixels, bad columns and rows, radiation),
plus a camera whose full well clips below the ADC maximum. On a GPU (``gpu`` marker) torch-cuda
with and without the device path must flag the same pixels and agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter1d

from cdae.engine import device_frame as D
from cdae.engine import guard as G
from cdae.engine import normalise as N
from cdae.engine.architecture import ArchitectureConfig, build_model
from cdae.engine.backends import Backend, TorchBackend, TorchCUDABackend, load_backend
from cdae.engine.badpixels import BadPixelMap
from cdae.engine.config import BackendOptions
from cdae.engine.package import load_model, write_package
from cdae.engine.pipeline import denoise_frame
from cdae.training.defects import DefectConfig, simulate_frame
from cdae.training.simulate import SceneConfig

HAS_CUDA = torch.cuda.is_available()
ARCH = ArchitectureConfig(base_width=4, depth=1, convs_per_level=1)
NORMS = [N.NormalisationConfig(), N.NormalisationConfig(full_well="detect"),
         N.NormalisationConfig(full_well="detect+dark")]
GUARDS = [G.GuardConfig(defect_threshold=0.6),  # noise measured on the frame, the learned flag on
          G.GuardConfig(gain_e_per_dn=2.0, read_noise_dn=1.5, defect_threshold=None)]  # the camera's noise


def _simulated(index: int, bits: int, shape: tuple[int, int]) -> np.ndarray:
    _, det = simulate_frame(41, index, *shape, bits, SceneConfig(), DefectConfig.all_defects())
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.clip(np.rint(det.noisy), 0, 2**bits - 1).astype(dtype)


def _full_well_camera(shape: tuple[int, int] = (192, 256)) -> np.ndarray:
    """A 16-bit camera whose 100 ke- well clips at 51000 DN, below the ADC maximum (as in test_full_well)."""
    rng = np.random.default_rng(3)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    scene = 0.05 + 0.3 * rng.random(shape) * 0.1 + 0.8 * np.exp(-((yy - h / 2) ** 2 + (xx - w / 3) ** 2) / 1800.0)
    e = np.minimum(rng.poisson(3e5 * scene / scene.max()).astype(np.float64), 1e5)
    return np.clip(np.rint(1000.0 + (e + rng.normal(0.0, 8.0, e.shape)) / 2.0), 0, 65535).astype(np.uint16)


FRAMES = [(f"{bits}bit-{i}", _simulated(i, bits, shape), bits)
          for i, (bits, shape) in enumerate([(8, (96, 128)), (12, (160, 200)), (16, (131, 157)), (16, (128, 128)),
                                             (12, (96, 128)), (8, (160, 200))])]
FRAMES.append(("full-well", _full_well_camera(), 16))
FRAMES.append(("16bit-sampled", _simulated(9, 16, (540, 620)), 16))  # percentiles and noise pairs on a grid (step 2, 3)
IDS = [name for name, _, _ in FRAMES]


def test_percentiles_and_medians_are_numpys() -> None:
    rng = np.random.default_rng(0)
    for n in (17, 1000, 4097):
        for dtype in (np.float32, np.float64):
            a = (rng.normal(size=n) * 1000).astype(dtype)
            for q in (0.1, 10, 90.0, 99.9, 100, [0.5, 99.9], [10, 80.0, 100]):
                want, got = np.percentile(a, q), D.percentile(torch.from_numpy(a), q)
                assert np.asarray(got).dtype == np.asarray(want).dtype and np.array_equal(got, want), (n, dtype, q)
            for m in (n, n - 1):
                assert float(D.median(torch.from_numpy(a[:m]))) == np.median(a[:m])


@pytest.mark.parametrize("axis", [0, 1])
def test_the_line_tests_running_mean_is_scipys(axis: int) -> None:
    t = (np.random.default_rng(1).normal(size=(150, 120)) * 3).astype(np.float32)
    got = D.uniform_filter1d(torch.from_numpy(t), 9, dim=axis).numpy()
    assert np.array_equal(got, uniform_filter1d(t, 9, axis=axis, mode="nearest"))


@pytest.mark.parametrize("name,frame,bits", FRAMES, ids=IDS)
def test_network_input_and_full_well_are_the_numpy_paths(name: str, frame: np.ndarray, bits: int) -> None:
    adc = N.adc_max_for(frame.dtype, bits)
    f = torch.from_numpy(frame.astype(np.float32))
    found = 0
    for config in NORMS:
        want, got = N.detect_full_well(frame.astype(np.float32), adc, config), D.detect_full_well(f, adc, config)
        assert (want is None) == (got is None)
        if want is not None and got is not None:
            # the pair variance's float64 mean sums in torch's order, not NumPy's pairwise one: the last bits
            assert (got.level, got.pixels) == (want.level, want.pixels)
            assert got.half_width == pytest.approx(want.half_width, rel=1e-12)
        x, offset, scale = N.network_input(frame, adc, config)
        xt, offset_t, scale_t = D.network_input(f, adc, config)
        assert (offset_t, scale_t) == (offset, scale)
        assert np.array_equal(xt.numpy(), x), config.full_well
        found += N.detect_full_well(frame.astype(np.float32), adc, config) is not None
    if name == "full-well":
        assert found == 2  # detect and detect+dark both find it: the comparison covered a found well


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"])
def test_the_host_statistics_are_network_inputs(dtype: str) -> None:
    """What the device path reads on the host (offset, scale, full well, the saturation mask the noise model leaves
    out) is what network_input decides with, for every dtype the device path takes and every full-well setting."""
    frames = [(name, frame, bits) for name, frame, bits in FRAMES if frame.dtype == np.uint16][:3]
    frames.append(("full-well", _full_well_camera(), 16))
    found = 0
    for name, frame, bits in frames:
        shift = {"uint8": 8, "int16": 1}.get(dtype, 0)  # into the type's range
        frame = (frame >> shift).astype(dtype)
        adc = N.adc_max_for(frame.dtype, None if dtype in ("uint32", "float32", "float64") else bits - shift)
        for config in NORMS:
            for candidates in (1, 8):
                x, offset, scale = N.network_input(frame, adc, config, candidates)
                read, *got, fw = N.frame_statistics(frame, adc, config, candidates)
                assert tuple(got) == (offset, scale), (name, dtype)
                assert read is frame if frame.dtype in (np.uint8, np.uint16, np.int16) else read.dtype == np.float32
                found += fw is not None
                mask = N.saturation_mask(frame.astype(np.float32), adc, fw)
                assert np.array_equal(mask, x[1] > 0.5), (name, dtype, config.full_well)
    assert found > 0  # a full well was found and its mask compared
    bad = FRAMES[0][1].astype(np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(N.NormalisationError, match="NaN"):
        N.frame_statistics(bad, N.adc_max_for(bad.dtype, None), NORMS[0])


@pytest.mark.parametrize("name,frame,bits", FRAMES, ids=IDS)
def test_the_guard_is_the_numpy_paths(name: str, frame: np.ndarray, bits: int) -> None:
    adc = N.adc_max_for(frame.dtype, bits)
    f = frame.astype(np.float32)
    x, _, _ = N.network_input(frame, adc, N.NormalisationConfig(full_well="detect"))
    rng = np.random.default_rng(7)
    out = (f + rng.normal(0.0, 3.0, f.shape)).astype(np.float32)  # a stand-in network output in DN
    prob = rng.random(f.shape, dtype=np.float32)
    saturated = x[1] > 0.5
    for config in GUARDS:
        want = G.guard(frame, out, saturated, config, prob)
        got, flags, noise = D.guard(torch.from_numpy(f), torch.from_numpy(out), torch.from_numpy(saturated), config,
                                    torch.from_numpy(prob))
        assert noise == want.noise
        assert np.array_equal(flags.numpy(), want.flags)
        assert np.array_equal(got.numpy(), want.output)
        # the simulated frames' hot, dead and line defects were tested; the full well is flagged saturated
        assert want.counts["saturated" if name == "full-well" else "impulse"] > 0
        if config.defect_threshold is not None:  # the learned flag's evidence and peak tests were compared too
            assert 0 < want.counts["learned"] < int((prob > config.defect_threshold).sum()) // 2


@pytest.mark.parametrize("axis", [0, 1])
def test_the_line_peak_test_is_the_numpy_paths(axis: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real filament and a faint streak, both claimed by the head along their length: the line test (one sum
    along the line over the frame, its stretches views of it) finds the streak sharper than the optics, exactly
    as NumPy's per-candidate sums do."""
    rng = np.random.default_rng(11)
    f = rng.normal(200.0, 4.0, (96, 120)).astype(np.float32)
    prob = np.zeros(f.shape, dtype=np.float32)
    lines = {"filament": (30, np.array([0.3, 1.0, 0.3]) * 400.0), "streak": (60, np.array([0.0, 1.0, 0.0]) * 15.0)}
    for row, profile in lines.values():
        for k, v in enumerate(profile):
            f[row - 1 + k, 20:80] += v
        prob[row - 1: row + 2, 20:80] = 0.9
    if axis == 0:
        f, prob = np.ascontiguousarray(f.T), np.ascontiguousarray(prob.T)
    frame = np.clip(np.rint(f), 0, 4095).astype(np.uint16)
    f = frame.astype(np.float32)
    out = (f + rng.normal(0.0, 3.0, f.shape)).astype(np.float32)
    seen: list[int] = []
    line_peak = D._line_peak

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        peak = line_peak(*args, **kwargs)
        seen.append(int((peak & args[2]).sum()))  # at pixels the head claimed along a line
        return peak

    monkeypatch.setattr(D, "_line_peak", counted)
    config = G.GuardConfig(defect_threshold=0.5)
    none = np.zeros(f.shape, dtype=bool)
    want = G.guard(frame, out, none, config, prob)
    got, flags, _ = D.guard(torch.from_numpy(f), torch.from_numpy(out), torch.from_numpy(none), config,
                            torch.from_numpy(prob))
    assert np.array_equal(flags.numpy(), want.flags) and np.array_equal(got.numpy(), want.output)
    assert seen and seen[0] > 0  # the line test ran and found a line sharper than the optics (the streak)
    assert want.counts["learned"] > 0


@pytest.mark.parametrize("dim", [0, 1])
def test_claimed_along_is_the_clamped_line_test(dim: int) -> None:
    """All of a line's pixels claimed, positions past the edge reading the edge pixel (NumPy's clamped indices)."""
    claimed = np.random.default_rng(dim).random((23, 31)) < 0.85
    h, w = claimed.shape
    want = np.ones_like(claimed)
    for k in range(-4, 5):
        ys, xs = np.mgrid[:h, :w]
        if dim == 0:
            ys = np.clip(ys + k, 0, h - 1)
        else:
            xs = np.clip(xs + k, 0, w - 1)
        want &= claimed[ys, xs]
    assert 0 < want.sum() < want.size
    assert np.array_equal(D._claimed_along(torch.from_numpy(claimed), dim, 9).numpy(), want)


@pytest.mark.parametrize("passes,length,lines", [(1, 9, True), (3, 9, True), (4, 17, True), (2, 4, True),
                                                  (2, 2, True), (2, 1, True), (2, 9, False)])
def test_the_guard_is_the_numpy_paths_across_settings(passes: int, length: int, lines: bool) -> None:
    """The whole-frame passes without early exits, the line test at other lengths (even ones too) and off, on
    simulated frames and on frames a few pixels across: the NumPy guard's flags and output exactly."""
    config = G.GuardConfig(defect_threshold=0.5, impulse_passes=passes, line_length=length, learned_line_peaks=lines)
    rng = np.random.default_rng(passes * 100 + length)
    small = _simulated(7, 12, (40, 40))
    frames = [FRAMES[1][1], FRAMES[4][1], small[:3], small[:, :3].copy(), small[:5, :7], small[:12, :12]]
    for frame in frames:
        f = frame.astype(np.float32)
        out = (f + rng.normal(0.0, 3.0, f.shape)).astype(np.float32)
        prob = rng.random(f.shape, dtype=np.float32)
        none = np.zeros(f.shape, dtype=bool)
        want = G.guard(frame, out, none, config, prob)
        got, flags, _ = D.guard(torch.from_numpy(f), torch.from_numpy(out), torch.from_numpy(none), config,
                                torch.from_numpy(prob))
        assert np.array_equal(flags.numpy(), want.flags) and np.array_equal(got.numpy(), want.output), frame.shape


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchBackend, TorchBackend]:
    """One tiny random-weight network, as torch-cpu runs it (NumPy around it) and on the device path (CPU)."""
    store = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    write_package(store, name="t", version="1", state_dict=build_model(ARCH).state_dict(), architecture=ARCH)
    manifest, model = load_model(store / "t" / "1")
    manifest = manifest.model_copy(update={"normalisation": N.NormalisationConfig(full_well="detect")})
    return TorchBackend(manifest, model), TorchBackend(manifest, model, device_pre_post=True)


def _same(a, b) -> None:  # noqa: ANN001 - two FrameResults
    assert b.denoised.dtype == a.denoised.dtype and b.tiles == a.tiles
    assert np.array_equal(b.denoised, a.denoised)
    assert (a.residual is None and b.residual is None) or np.array_equal(b.residual, a.residual)
    assert np.array_equal(b.defect_probability, a.defect_probability)
    assert (a.flags is None and b.flags is None) or np.array_equal(b.flags, a.flags)
    assert b.flag_counts == a.flag_counts


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"])
def test_the_device_path_on_the_cpu_is_the_host_path(backends: tuple[TorchBackend, TorchBackend], dtype: str) -> None:
    host, device = backends
    frame = _simulated(3, 8 if dtype in ("uint8", "int16") else 12, (100, 130)).astype(dtype)
    bits = None if dtype == "uint32" else (8 if dtype in ("uint8", "int16") else 12)
    for on_host in (True, False):  # the offset, scale, full well and noise model read on the host, or on the device
        device.host_statistics = on_host  # type: ignore[attr-defined]
        for guard in (None, GUARDS[0]):
            for max_pixels in (10**8, 64 * 64) if dtype in ("uint16", "float32") else (10**8,):  # whole, and tiled
                kw = dict(bit_depth=bits, guard_config=guard, max_pixels=max_pixels)
                _same(denoise_frame(frame, host, **kw), denoise_frame(frame, device, **kw))  # type: ignore[arg-type]
    del device.host_statistics  # type: ignore[attr-defined]


def test_the_device_path_fills_the_bad_pixel_map_and_skips_the_residual(
        backends: tuple[TorchBackend, TorchBackend]) -> None:
    host, device = backends
    name, frame, bits = FRAMES[1]
    mask = np.zeros(frame.shape, bool)
    mask[10:12, 20] = mask[50, 60] = True
    bad = BadPixelMap.from_mask(mask)
    for want_residual in (True, False):
        kw = dict(bit_depth=bits, guard_config=GUARDS[0], bad_pixels=bad, want_residual=want_residual)
        a, b = denoise_frame(frame, host, **kw), denoise_frame(frame, device, **kw)  # type: ignore[arg-type]
        _same(a, b)
        assert b.flag_counts is not None and b.flag_counts["bad_pixel_map"] == 3


def test_frames_the_device_path_does_not_take_go_the_host_way(backends: tuple[TorchBackend, TorchBackend]) -> None:
    host, device = backends
    huge = np.random.default_rng(2).normal(0.0, 1e37, (64, 64)).astype(np.float32)  # beyond FLOAT_FRAME_LIMIT
    _same(denoise_frame(huge, host), denoise_frame(huge, device))
    big_endian = _simulated(0, 12, (64, 80)).astype(">u2")
    _same(denoise_frame(big_endian, host, bit_depth=12), denoise_frame(big_endian, device, bit_depth=12))
    bad = np.ones((64, 64), np.float32)
    bad[3, 4] = np.nan
    for runner in (host, device):
        with pytest.raises(N.NormalisationError, match="1 NaN/Inf"):
            denoise_frame(bad, runner)


def test_torch_cpu_keeps_the_host_path_and_torch_cuda_defaults_to_the_device_path(
        backends: tuple[TorchBackend, TorchBackend]) -> None:
    from cdae.engine.backends import TorchCPUBackend

    host, _ = backends
    assert TorchCPUBackend(host.manifest, host.model, "fp32").frame_on_device is False  # its numbers stay NumPy's
    assert BackendOptions().device_pre_post is True


def test_the_results_travel_packed_in_one_buffer() -> None:
    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 4096, (5, 7)).astype(np.uint16).view(np.int16), None,
              rng.random((5, 7), dtype=np.float32), rng.integers(0, 5, (5, 7)).astype(np.uint8),
              np.arange(5, dtype=np.int64), rng.random((3, 3))]
    packed, spans = D.pack([None if a is None else torch.from_numpy(a) for a in arrays], torch.device("cpu"))
    assert all(span is None or span[0] % 16 == 0 for span in spans)
    for a, b in zip(arrays, D.unpack(packed.numpy(), spans)):
        assert (a is None and b is None) or (b is not None and b.dtype == a.dtype and np.array_equal(a, b))


class _TorchCUDAOnTheCPU(TorchCUDABackend):
    """torch-cuda's own network call (``infer_tensor`` → ``_network`` → ``_forward``: padding, channels-last,
    autocast off, the crop) on the CPU, graphs off and no stream: its constructor needs a GPU, these methods do not."""

    def __init__(self, host: TorchBackend) -> None:  # noqa: D107 - not TorchCUDABackend's: that one needs CUDA
        Backend.__init__(self, host.manifest, "cpu")
        self.torch_device, self.autocast, self.use_graphs, self.max_graphs = torch.device("cpu"), None, False, 1
        self.model, self._graphs, self._seen, self.graph_captures = host.model, OrderedDict(), {}, 0
        self.frame_on_device, self.frame_staging, self.tile_batch = True, D.FrameStaging(self.torch_device), 1

    def device_scope(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()


def test_torch_cudas_device_path_runs_on_a_cpu_stand_in(backends: tuple[TorchBackend, TorchBackend]) -> None:
    host, _ = backends
    stand_in = _TorchCUDAOnTheCPU(host)
    name, frame, bits = FRAMES[2]  # 131 x 157: padded to the network's multiple, then cropped
    for max_pixels in (10**8, 64 * 64):
        kw = dict(bit_depth=bits, guard_config=GUARDS[0], max_pixels=max_pixels)
        _same(denoise_frame(frame, host, **kw), denoise_frame(frame, stand_in, **kw))  # type: ignore[arg-type]
    # tiles of one shape batched into one network call (groups of 1 and 2 here): the same tiles, stitched the same
    calls: list[tuple[int, ...]] = []
    batch = stand_in.infer_batch

    def counted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(x.shape))
        return batch(x)

    stand_in.infer_batch = counted  # type: ignore[method-assign]
    kw = dict(bit_depth=bits, guard_config=GUARDS[0], max_pixels=64 * 64)
    a = denoise_frame(frame, host, **kw)  # type: ignore[arg-type]
    for tile_batch in (2, 3, 4):
        stand_in.tile_batch = tile_batch
        calls.clear()
        b = denoise_frame(frame, stand_in, **kw)  # type: ignore[arg-type]
        assert b.tiles == a.tiles and len(calls) < a.tiles and max(c[0] for c in calls) == min(tile_batch, 2)
        assert np.array_equal(b.flags, a.flags)  # type: ignore[arg-type]
        np.testing.assert_allclose(b.denoised.astype(np.float64), a.denoised, atol=1)  # oneDNN's batched kernels
        np.testing.assert_allclose(b.defect_probability, a.defect_probability, atol=1e-5)


# --- on a GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,frame,bits", FRAMES, ids=IDS)
def test_the_stages_on_a_gpu_match_numpy(name: str, frame: np.ndarray, bits: int) -> None:
    """The same torch code on CUDA: IEEE float32 arithmetic as on the CPU; only float64 sums (the pair variance, the
    line test's running sum) add in another order, so the input may differ in its last bit and a flag may flip
    where a test statistic sits on its threshold."""
    adc = N.adc_max_for(frame.dtype, bits)
    f = frame.astype(np.float32)
    cuda = torch.device("cuda")
    config = N.NormalisationConfig(full_well="detect")
    x, offset, scale = N.network_input(frame, adc, config)
    xt, offset_t, scale_t = D.network_input(torch.from_numpy(f).to(cuda), adc, config)
    assert (offset_t, scale_t) == (offset, scale)
    np.testing.assert_allclose(xt.cpu().numpy(), x, rtol=1e-6, atol=1e-6)
    rng = np.random.default_rng(7)
    out = (f + rng.normal(0.0, 3.0, f.shape)).astype(np.float32)
    prob = rng.random(f.shape, dtype=np.float32)
    want = G.guard(frame, out, x[1] > 0.5, GUARDS[0], prob)
    got, flags, _ = D.guard(*(torch.from_numpy(a).to(cuda) for a in (f, out)), torch.from_numpy(x[1] > 0.5).to(cuda),
                            GUARDS[0], torch.from_numpy(prob).to(cuda))
    same = flags.cpu().numpy() == want.flags
    assert (~same).sum() <= max(2, 1e-5 * frame.size), name
    np.testing.assert_allclose(got.cpu().numpy()[same], want.output[same], rtol=1e-6, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_cuda_on_the_device_path_matches_its_host_path(tmp_path: Path, precision: str) -> None:
    """Whole frames through torch-cuda with and without device_pre_post: the same input, the same network (cuDNN
    may still pick another kernel per instance: network-level differences, as in test_backends' tolerances)."""
    store = tmp_path / "store"
    torch.manual_seed(0)
    write_package(store, name="t", version="1", state_dict=build_model(ARCH).state_dict(), architecture=ARCH,
                  normalisation=N.NormalisationConfig(full_well="detect"))
    opts = BackendOptions(precision=precision)
    on = load_backend("torch-cuda", store / "t" / "1", opts)
    off = load_backend("torch-cuda", store / "t" / "1", opts.model_copy(update={"device_pre_post": False}))
    assert on.frame_on_device and not off.frame_on_device  # type: ignore[attr-defined]
    tol = 5e-3 if precision == "fp32" else 5e-2  # normalised units, test_backends' tolerances
    for name, frame, bits in FRAMES:
        for _ in range(3):  # eager, then the captured graph
            a = denoise_frame(frame, off, bit_depth=bits, guard_config=GUARDS[0])
            b = denoise_frame(frame, on, bit_depth=bits, guard_config=GUARDS[0])
        _, _, scale = N.network_input(frame, N.adc_max_for(frame.dtype, bits), N.NormalisationConfig(full_well="detect"))
        assert b.denoised.dtype == a.denoised.dtype
        assert np.abs(b.denoised.astype(np.float64) - a.denoised).max() <= max(1.0, tol * scale) + 0.5, name
        assert np.abs(b.defect_probability - a.defect_probability).max() <= tol, name
        assert a.flags is not None and b.flags is not None
        assert (a.flags != b.flags).mean() <= 1e-3, name
    name, frame, bits = FRAMES[1]
    for _ in range(3):  # tiled, tiles of one shape batched on the device path
        a = denoise_frame(frame, off, bit_depth=bits, guard_config=GUARDS[0], max_pixels=64 * 64)
        b = denoise_frame(frame, on, bit_depth=bits, guard_config=GUARDS[0], max_pixels=64 * 64)
    assert a.tiles == b.tiles > 4 and a.flags is not None and b.flags is not None
    assert (a.flags != b.flags).mean() <= 1e-3
    assert np.abs(b.defect_probability - a.defect_probability).max() <= tol
    assert on.graph_captures >= 1  # type: ignore[attr-defined]
    # the guard replayed from its graph (backend_options.guard_graphs) on the same backend: the eager guard's bits
    for name, frame, bits in FRAMES[:4]:
        on.guard_graphs = None  # type: ignore[attr-defined]
        eager = denoise_frame(frame, on, bit_depth=bits, guard_config=GUARDS[0])
        on.guard_graphs = D.GuardGraphs(on.torch_device)  # type: ignore[attr-defined]
        for _ in range(3):  # eager, captured, replayed
            replayed = denoise_frame(frame, on, bit_depth=bits, guard_config=GUARDS[0])
        assert on.guard_graphs.captures == 1, on.guard_graphs.state  # type: ignore[attr-defined]
        _same(eager, replayed)
    on.close()
    off.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("side_stream", [True, False])
def test_the_guards_cuda_graph_replays_each_frames_noise(side_stream: bool) -> None:
    """The guard after its noise model, replayed from a captured graph: each frame's own tensors and noise
    constants, so its output and flags are the eager guard's exactly, frame after frame and shape after shape,
    also when frames follow each other with no sync between them, and from the default stream."""
    dev = torch.device("cuda")
    graphs = D.GuardGraphs(dev, max_graphs=3)
    config = GUARDS[0]
    rng = np.random.default_rng(5)
    cases = []
    for rounds in range(4):
        for name, frame, bits in FRAMES[:3]:
            scale = 1.0 + 0.1 * rounds  # another noise model each round
            f = torch.from_numpy(frame.astype(np.float32) * scale).to(dev)
            out = f + torch.from_numpy(rng.normal(0.0, 3.0, frame.shape).astype(np.float32)).to(dev)
            prob = torch.from_numpy(rng.random(frame.shape, dtype=np.float32)).to(dev)
            cases.append((name, rounds, f, out, prob, f >= N.adc_max_for(frame.dtype, bits) - 0.5))
    with torch.cuda.stream(torch.cuda.Stream(dev)) if side_stream else contextlib.nullcontext():
        got = []
        for _, _, f, out, prob, sat in cases:  # one after another, no sync: each copy queued behind its replay
            o, fl, noise = D.guard(f, out, sat, config, prob, graphs=graphs)
            got.append((o.clone(), fl.clone(), noise))
        for (name, rounds, f, out, prob, sat), (o, fl, noise) in zip(cases, got):
            want, want_flags = D.guard_core(f, out, sat, prob, config, noise)
            assert torch.equal(fl, want_flags) and torch.equal(o, want), (name, rounds)
    assert graphs.captures == 3 and graphs.state == "on"  # each shape captured once, then replayed


