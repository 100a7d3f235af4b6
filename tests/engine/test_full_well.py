"""Full-well detection: pixels clipped by the sensor's well, below the ADC maximum, are found and read as saturated."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cdae.engine.normalise import NormalisationConfig, find_full_well, network_input

ADC = 65535.0
BIAS = 1000.0
GAIN = 2.0  # e- per DN
READ_E = 8.0
FULL_WELL_E = 100_000.0
LEVEL = BIAS + FULL_WELL_E / GAIN  # 51000 DN: the well fills before the ADC does


def _camera(electrons: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A camera reading: shot noise, the well clips, read noise, gain and bias; and the clean reading."""
    rng = np.random.default_rng(seed)
    e = np.minimum(rng.poisson(electrons).astype(np.float64), FULL_WELL_E)
    raw = np.clip(np.rint(BIAS + (e + rng.normal(0.0, READ_E, e.shape)) / GAIN), 0, ADC)
    clean = BIAS + np.minimum(electrons, FULL_WELL_E) / GAIN
    return raw.astype(np.float32), clean


def _scene(peak_e: float, shape: tuple[int, int] = (256, 320)) -> np.ndarray:
    """Turbulent-looking texture plus a broad blob, scaled so that its brightest part reaches ``peak_e``."""
    rng = np.random.default_rng(1)
    h, w = shape
    k = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
    k[0, 0] = 1.0
    tex = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=shape)) * k ** -0.75))
    tex = (tex - tex.min()) / np.ptp(tex)
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-((yy - h / 2) ** 2 + (xx - w / 3) ** 2) / (2 * 30.0**2))
    s = 0.05 + 0.4 * tex + 0.8 * blob
    return peak_e * s / s.max()


@pytest.mark.parametrize("shape", [(256, 320), (1024, 1024)])  # the second on a sampling grid
def test_a_clipped_well_is_found_at_its_level(shape: tuple[int, int]) -> None:
    raw, clean = _camera(_scene(3.0 * FULL_WELL_E, shape))
    fw = find_full_well(raw, ADC)
    assert fw is not None
    assert abs(fw.level - LEVEL) <= 2.0 and fw.half_width <= 4 * 2 * READ_E / GAIN + 1
    clipped = clean >= LEVEL
    found = np.abs(raw - fw.level) <= fw.half_width
    # clipped in `clean` but not always in the raw frame: just above the well, shot noise can fall below it
    assert (found & clipped).sum() >= 0.98 * clipped.sum()
    # unclipped pixels that their shot noise put within the read noise of the well: a few (reading them
    # as the well moves them by at most the half-width, less than the noise that put them there)
    assert (found & ~clipped).sum() <= 0.02 * clipped.sum()


@pytest.mark.parametrize("peak_fraction", [0.6, 0.98])
def test_nothing_is_found_where_nothing_clipped(peak_fraction: float) -> None:
    raw, _ = _camera(_scene(peak_fraction * FULL_WELL_E))  # brightest real feature just below the well
    assert find_full_well(raw, ADC) is None


def test_a_flat_bright_field_is_not_a_full_well() -> None:
    # an evenly lit aperture at 80 % of the well: a pile-up at the top, but as wide as its shot noise
    e = np.full((256, 256), 0.8 * FULL_WELL_E)
    e[:, :64] = 0.05 * FULL_WELL_E  # a shadow
    raw, _ = _camera(e)
    assert find_full_well(raw, ADC) is None


def test_dark_and_eight_bit_frames_find_nothing() -> None:
    rng = np.random.default_rng(3)
    assert find_full_well(rng.normal(100, 3, (128, 128)).astype(np.float32), ADC) is None
    eight = np.clip(np.rint(rng.normal(60, 4, (128, 128)) + 100 * np.linspace(0, 1, 128)[None]), 0, 255)
    assert find_full_well(eight.astype(np.float32), 255.0) is None
    assert find_full_well(np.zeros((64, 64), np.float32), 255.0) is None  # too small and flat


def test_network_input_reads_clipped_pixels_as_saturated_only_when_asked() -> None:
    raw, clean = _camera(_scene(3.0 * FULL_WELL_E))
    off = NormalisationConfig()
    on = NormalisationConfig(full_well="detect")
    x_off, o, s = network_input(raw, ADC, off)
    x_on, o2, s2 = network_input(raw, ADC, on)
    assert (o, s) == (o2, s2)
    clipped = clean >= LEVEL
    assert x_off[1].sum() == 0  # nothing reaches the ADC maximum
    assert x_on[1][clipped].mean() > 0.99 and x_on[1][~clipped].mean() < 0.01
    # flagged pixels all read the well's level: the read noise on them is gone
    assert np.ptp(x_on[0][x_on[1] == 1]) == 0.0
    assert abs(float(x_on[0][clipped][0]) * s + o - LEVEL) <= 2.0
    np.testing.assert_array_equal(x_on[0][~clipped & (x_on[1] == 0)], x_off[0][~clipped & (x_on[1] == 0)])


def _small_well_camera(bright_e: float, seed: int = 0) -> tuple[np.ndarray, float]:
    """A 16-bit camera with a 2000 e- well over 59000 DN (read noise of ~240 DN): a dark shadow on the
    left, a field lit at ``bright_e`` on the right, nothing in between. Returns the frame and the well's DN."""
    well_e, dn_per_e, read_e = 2000.0, 29.5, 8.0
    e = np.full((192, 320), bright_e)
    e[:, :128] = 0.05 * well_e
    rng = np.random.default_rng(seed)
    e = np.minimum(rng.poisson(e).astype(np.float64), well_e)
    raw = np.clip(np.rint(BIAS + (e + rng.normal(0.0, read_e, e.shape)) * dn_per_e), 0, ADC)
    return raw.astype(np.float32), BIAS + well_e * dn_per_e


def test_a_field_wide_full_well_is_judged_against_the_dark_when_asked() -> None:
    # nothing at 50-85 % of the pile-up to compare with: 'detect' cannot tell, 'detect+dark' can
    raw, level = _small_well_camera(3.0 * 2000.0)
    assert find_full_well(raw, ADC) is None
    fw = find_full_well(raw, ADC, dark_reference=True)
    assert fw is not None and abs(fw.level - level) <= 30.0
    x, _, _ = network_input(raw, ADC, NormalisationConfig(full_well="detect+dark"))
    assert x[1][:, 128:].mean() > 0.99 and x[1][:, :128].mean() < 0.01
    assert network_input(raw, ADC, NormalisationConfig(full_well="detect"))[0][1].sum() == 0


def test_a_bright_field_below_a_small_well_is_not_a_full_well_even_against_the_dark() -> None:
    # real light at 80 % of the well carries its shot noise (40 e- against 8 e- of read noise)
    raw, _ = _small_well_camera(0.8 * 2000.0)
    assert find_full_well(raw, ADC, dark_reference=True) is None


def test_the_search_is_part_of_the_normalisation_a_manifest_records(tmp_path) -> None:  # noqa: ANN001
    from cdae.engine.architecture import ArchitectureConfig, build_model
    from cdae.engine.normalise import FullWellSearch, detect_full_well
    from cdae.engine.package import read_manifest, write_package

    raw, _ = _camera(_scene(3.0 * FULL_WELL_E))
    config = NormalisationConfig(full_well="detect")
    assert detect_full_well(raw, ADC, config) == find_full_well(raw, ADC)  # the defaults are the search
    strict = config.model_copy(update={"full_well_search": FullWellSearch(min_share=0.9)})
    assert detect_full_well(raw, ADC, strict) is None  # a pile-up of less than 90 % of the frame is not one
    arch = ArchitectureConfig(base_width=8, depth=2, convs_per_level=1)
    pkg = write_package(tmp_path, name="fw", version="1", state_dict=build_model(arch).state_dict(),
                        architecture=arch, normalisation=strict)
    assert read_manifest(pkg).normalisation.full_well_search.min_share == 0.9


def test_the_window_of_a_sorted_sample_is_the_elementwise_test() -> None:
    """find_full_well reads its windows as slices of the sorted sample (``_window``): the same pixels, to the
    last one at each edge, as ``np.abs(s - level) <= half`` over the whole sample, for integer and float
    samples, levels and half-widths on and between the values, infinities and NaN."""
    from cdae.engine.normalise import _window

    rng = np.random.default_rng(0)
    for t in range(4000):
        n = int(rng.integers(0, 200))
        s = [rng.integers(0, 40, n).astype(np.float64), rng.normal(0, 10, n),
             rng.integers(0, 4096, n) * float(rng.choice([1e-7, 1.0, 1e7, 1e300])), rng.normal(0, 1, n)][t % 4]
        if t % 4 == 3 and n:
            s[rng.integers(0, n, min(n, 3))] = rng.choice([np.inf, -np.inf, np.nan])
        s = np.sort(s)
        finite = s[np.isfinite(s)]
        level = (float(rng.choice(finite)) + float(rng.choice([0.0, 0.5, -0.5, 1e-9]))) if finite.size and t % 2 \
            else float(rng.normal(0, 20))
        half = float(rng.choice([0.0, 0.5, 1.0, 2.5, 10 * rng.random(), 1e-300, np.inf]))
        w = _window(s, level, half)
        np.testing.assert_array_equal(np.arange(w.start, w.stop), np.flatnonzero(np.abs(s - level) <= half),
                                      err_msg=f"{s} {level} {half}")


def _bright_scene_with_a_small_clipped_disc(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright real scene (30-70 % of the well, most of the frame above its 80th percentile's band) and a disc of
    0.7 % of the pixels past the well: the densest band near the top is the scene's, the well's spike beside it."""
    yy, xx = np.mgrid[:256, :256]
    e = FULL_WELL_E * (0.3 + 0.2 * (1 + np.sin(xx / 23.0) * np.cos(yy / 17.0)))
    disc = (yy - 128) ** 2 + (xx - 100) ** 2 <= 12**2
    e[disc] = 1.6 * FULL_WELL_E
    raw, _ = _camera(e, seed)
    return raw, disc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_small_well_beside_a_bright_scene_is_found_past_the_first_candidate(seed: int) -> None:
    """The first candidate (what the models were trained with) is the scene's densest band and fails the tests;
    the next peaks, highest first, find the well at its level with every clipped pixel; the device mirror too."""
    import torch

    from cdae.engine import device_frame

    raw, disc = _bright_scene_with_a_small_clipped_disc(seed)
    assert find_full_well(raw, ADC) is None
    fw = find_full_well(raw, ADC, candidates=8)
    assert fw is not None and abs(fw.level - LEVEL) <= 2.0
    found = np.abs(raw - fw.level) <= fw.half_width
    assert (found & disc).sum() == disc.sum() and (found & ~disc).sum() <= 2
    on_device = device_frame.find_full_well(torch.from_numpy(raw), ADC, candidates=8)
    assert on_device is not None and on_device.level == fw.level and on_device.pixels == fw.pixels
    # the training default is untouched: one candidate, nothing found, the same network input as before
    cfg = NormalisationConfig(full_well="detect")
    assert np.array_equal(network_input(raw, ADC, cfg)[0], network_input(raw, ADC, cfg, 1)[0])
    assert not network_input(raw, ADC, cfg)[0][1][disc].any() and network_input(raw, ADC, cfg, 8)[0][1][disc].all()


def test_a_pile_up_with_real_light_above_it_is_no_full_well() -> None:
    """Past the first candidate a well must have only lone pixels above it (hot pixels, hits), not real light."""
    from cdae.engine.normalise import FullWell, _only_impulses_above

    fw = FullWell(level=100.0, half_width=3.0, pixels=4000)
    f = np.full((128, 128), 50.0, np.float32)
    f[::16, ::16] = 200.0  # 64 lone hot pixels
    assert _only_impulses_above(f, fw, 255.0)
    f[10:20, 10:20] = 180.0  # a real bright patch above the "well"
    assert not _only_impulses_above(f, fw, 255.0)
    f[10:20, 10:20] = 255.0  # at the ADC maximum: saturated, flagged anyway, not counted
    assert _only_impulses_above(f, fw, 255.0)


def test_the_guarded_path_keeps_a_small_well_raw_where_the_network_would_move_it() -> None:
    """A network that darkens everything: with one candidate the disc's clipped pixels move by the shot noise of
    their level (far beyond the read noise they carry); the guard's default search flags them saturated and
    keeps them raw."""
    from pathlib import Path

    from cdae.engine.backends.passthrough import PassthroughBackend
    from cdae.engine.guard import SATURATED, GuardConfig
    from cdae.engine.package import read_manifest
    from cdae.engine.pipeline import denoise_frame

    class Darkening(PassthroughBackend):
        def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return np.array(x[0] - 0.5, dtype=np.float32), np.zeros(x.shape[1:], dtype=np.float32)

    manifest = read_manifest(Path(__file__).resolve().parents[2] / "models" / "cdae-default" / "11")
    runner = Darkening(manifest)
    raw, disc = _bright_scene_with_a_small_clipped_disc()
    frame = raw.astype(np.uint16)
    one = denoise_frame(frame, runner, guard_config=GuardConfig(defect_threshold=None, full_well_candidates=1))
    served = denoise_frame(frame, runner, guard_config=GuardConfig(defect_threshold=None))
    moved = np.abs(one.denoised.astype(np.float64) - frame)[disc]
    assert np.median(moved) > 10 * READ_E / GAIN  # the bound read the well's pixels as shot-noisy light
    assert served.flags is not None
    sat = disc & (served.flags == SATURATED)
    # all but the disc's four one-pixel tips (sharper than any optics: the impulse test takes those first)
    assert sat.sum() >= disc.sum() - 4 and (served.flags[disc & ~sat] != 0).all()
    assert np.array_equal(served.denoised[sat], frame[sat])


@pytest.mark.parametrize("dtype,adc", [(np.uint16, 65535.0), (np.uint16, 4095.0), (np.uint8, 255.0),
                                       (np.float32, ADC), (np.float32, float("inf")), (np.int32, 2.0**31 - 1)])
@pytest.mark.parametrize("peak_e", [0.5 * FULL_WELL_E, 3 * FULL_WELL_E])
def test_the_statistics_read_one_sorted_sample_with_the_same_numbers(dtype: type, adc: float, peak_e: float) -> None:
    """frame_statistics sorts the statistics' sample once for the offset, the scale and the full-well search: the same
    numbers as each reading its own sample, for every dtype and full scale (an int32 frame's cut, 2^31 - 1.5, is not a
    float32: it takes the offset's own sample), a frame mostly saturated included (offset from every pixel)."""
    from cdae.engine.normalise import detect_full_well, frame_offset_scale, frame_statistics

    cfg = NormalisationConfig(full_well="detect+dark", max_samples=4096)
    raw, _ = _camera(_scene(peak_e, (200, 330)))
    top = 255.0 if dtype is np.uint8 else min(adc, 65535.0)
    frame = (np.clip(raw * (top / ADC), 0, top)).astype(dtype)
    saturated = frame.copy()
    saturated[:, : 300] = top  # over 90 % of the sample at full scale: the percentiles read every pixel
    for f in (frame, saturated):
        ff, offset, scale, fw = frame_statistics(f, adc, cfg, 8)
        assert struct.pack("dd", offset, scale) == struct.pack("dd", *frame_offset_scale(ff, adc, cfg))  # -0.0 too
        assert fw == detect_full_well(ff, adc, cfg, 8)
    assert frame_statistics(frame, adc, cfg, 8)[3] is not None or peak_e < FULL_WELL_E or dtype is np.uint8


def test_zeros_of_both_signs_give_the_offset_the_per_function_path_gives() -> None:
    """A float frame whose low percentile falls on zeros of both signs: which zero a sort puts first depends on the
    sort's dtype, so the shared sample is not used for the offset there (its sign was -0.0 before, would be +0.0)."""
    from cdae.engine.normalise import frame_offset_scale, frame_statistics

    rng = np.random.default_rng(2)
    f = np.abs(rng.standard_normal((100, 180))).astype(np.float32)
    f[rng.random(f.shape) < 0.5] = 0.0
    f[rng.random(f.shape) < 0.3] = -0.0
    cfg = NormalisationConfig()
    _, offset, scale, _ = frame_statistics(f, float("inf"), cfg)
    assert struct.pack("dd", offset, scale) == struct.pack("dd", *frame_offset_scale(f, float("inf"), cfg))
