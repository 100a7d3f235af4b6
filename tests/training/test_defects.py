"""Detector model: noise statistics, defect classes, ground-truth mask, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from cdae.training.defects import (
    BAD_LINE,
    BIT_DEPTHS,
    BLOOM,
    DEAD,
    HOT,
    MASK_BITS,
    RADIATION,
    SATURATED_BLOB,
    DefectConfig,
    DefectParams,
    apply_detector,
    sample_defect_layout,
    sample_defect_params,
    simulate_frame,
)

FIXED = dict(  # one fully specified sensor: 2e4 e- full well, 10 e- read noise
    full_well_e=(2e4, 2e4),
    full_scale_fraction=(0.95, 0.95),
    read_noise_e=(10.0, 10.0),
    bias_frac=(0.05, 0.05),
    prnu_frac=(0.0, 0.0),
    dsnu_frac=(0.0, 0.0),
    exposure_scale=(1.0, 1.0),
)


def _params(config: DefectConfig, bit_depth: int = 12, seed: int = 0) -> DefectParams:
    return sample_defect_params(np.random.default_rng(seed), config, bit_depth)


def _flat(level: float, shape: tuple[int, int] = (128, 128)) -> np.ndarray:
    return np.full(shape, level, np.float32)


def test_same_seed_and_index_give_identical_frames() -> None:
    cfg = DefectConfig.all_defects()
    s1, a = simulate_frame(4, 7, 64, 48, 12, defect_config=cfg)
    s2, b = simulate_frame(4, 7, 64, 48, 12, defect_config=cfg)
    np.testing.assert_array_equal(s1.signal, s2.signal)
    np.testing.assert_array_equal(a.noisy, b.noisy)
    np.testing.assert_array_equal(a.clean, b.clean)
    np.testing.assert_array_equal(a.defect_mask, b.defect_mask)
    assert a.params == b.params
    _, c = simulate_frame(4, 8, 64, 48, 12, defect_config=cfg)
    assert not np.array_equal(a.noisy, c.noisy)


def test_detector_config_does_not_change_the_scene() -> None:
    s1, a = simulate_frame(2, 3, 40, 40, 16, defect_config=DefectConfig.noise_only())
    s2, b = simulate_frame(2, 3, 40, 40, 16, defect_config=DefectConfig.all_defects())
    np.testing.assert_array_equal(s1.signal, s2.signal)
    assert not np.array_equal(a.defect_mask, b.defect_mask)


@pytest.mark.parametrize("bit_depth", BIT_DEPTHS)
@pytest.mark.parametrize("shape", [(64, 64), (100, 37), (37, 100)])
def test_frame_shapes_dtypes_and_ranges(bit_depth: int, shape: tuple[int, int]) -> None:
    cfg = DefectConfig.all_defects()
    for index in range(3):
        scene, frame = simulate_frame(1, index, *shape, bit_depth, defect_config=cfg)
        assert frame.adc_max == 2**bit_depth - 1 == frame.params.adc_max
        assert frame.bit_depth == bit_depth
        for name in ("noisy", "clean"):
            a = getattr(frame, name)
            assert a.shape == shape and a.dtype == np.float32, name
            assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= frame.adc_max, name
        np.testing.assert_array_equal(frame.noisy, np.rint(frame.noisy))  # quantised
        assert frame.defect_mask.shape == shape and frame.defect_mask.dtype == np.uint8
        assert scene.signal.shape == shape


def test_one_large_frame() -> None:
    scene, frame = simulate_frame(0, 0, 2048, 2048, 16)
    assert scene.signal.shape == frame.noisy.shape == frame.clean.shape == (2048, 2048)
    assert frame.noisy.max() <= frame.adc_max and frame.clean.min() >= 0
    assert np.abs(frame.noisy - frame.clean).mean() < 0.05 * frame.adc_max


def test_clean_is_expected_signal_clipped_at_full_well() -> None:
    params = _params(DefectConfig.noise_only(**FIXED), bit_depth=12)
    signal = np.array([[0.0, 0.25, 1.0, 3.0]], np.float32).repeat(8, axis=0)
    signal = np.tile(signal, (1, 4))
    clean = apply_detector(signal, np.random.default_rng(1), params).clean
    span = params.adc_max - params.bias_dn
    expected = params.bias_dn + np.minimum(signal, 1.0) * 0.95 * span
    np.testing.assert_allclose(clean, expected, rtol=1e-5)
    assert clean.max() == pytest.approx(params.saturation_dn)  # a real saturating feature


@pytest.mark.parametrize("bit_depth", [12, 16])
@pytest.mark.parametrize(
    ("level", "prnu", "dsnu_frac"),
    [(0.001, 0.0, 0.0), (0.01, 0.0, 0.0), (0.4, 0.0, 0.0), (0.4, 0.02, 0.001)],
)
def test_noise_variance_matches_the_sensor_model(
    bit_depth: int, level: float, prnu: float, dsnu_frac: float
) -> None:
    cfg = DefectConfig.noise_only(**{**FIXED, "prnu_frac": (prnu, prnu),
                                     "dsnu_frac": (dsnu_frac, dsnu_frac)})
    params = _params(cfg, bit_depth)
    frame = apply_detector(_flat(level, (160, 160)), np.random.default_rng(2), params)
    g = params.gain_e_per_dn
    electrons = level * params.full_well_e
    expected = (
        (electrons + params.read_noise_e**2) / g**2
        + (prnu * electrons / g) ** 2
        + params.dsnu_dn**2
        + 1.0 / 12.0
    )
    residual = (frame.noisy - frame.clean).astype(np.float64)
    assert residual.var() == pytest.approx(expected, rel=0.1)
    assert abs(residual.mean()) < 0.05 * np.sqrt(expected) + 0.05
    assert not frame.defect_mask.any()


def test_noise_only_config_has_no_defects() -> None:
    for index in range(5):
        _, frame = simulate_frame(3, index, 64, 64, 12, defect_config=DefectConfig.noise_only())
        assert not frame.defect_mask.any()


def test_every_defect_class_appears_when_forced_on() -> None:
    seen = 0
    for index in range(3):
        _, frame = simulate_frame(5, index, 128, 128, 12, defect_config=DefectConfig.all_defects())
        seen |= int(np.bitwise_or.reduce(frame.defect_mask, axis=None))
        for bit in MASK_BITS.values():
            if bit != BLOOM or frame.params.bloom:
                assert (frame.defect_mask & bit).any(), (index, bit)
    assert seen == sum(MASK_BITS.values())


def test_default_config_has_clean_and_damaged_frames() -> None:
    damaged = [
        int((simulate_frame(6, i, 48, 48, 12)[1].defect_mask > 0).sum()) for i in range(40)
    ]
    assert sum(d == 0 for d in damaged) >= 3
    assert sum(d > 0 for d in damaged) >= 10


def test_dead_pixels_read_bias_and_hot_pixels_read_high() -> None:
    cfg = DefectConfig.noise_only(
        **FIXED,
        dead_pixel_probability=1.0, dead_pixel_frac=(3e-3, 3e-3),
        hot_pixel_probability=1.0, hot_pixel_frac=(3e-3, 3e-3),
    )
    params = _params(cfg, 12)
    frame = apply_detector(_flat(0.6), np.random.default_rng(3), params)
    layout = frame.layout
    read_dn = params.read_noise_e / params.gain_e_per_dn
    assert len(layout.dead_pixels) > 10
    dead = frame.noisy[layout.dead_pixels[:, 0], layout.dead_pixels[:, 1]]
    clean_dead = frame.clean[layout.dead_pixels[:, 0], layout.dead_pixels[:, 1]]
    # Residual response <= 10 %: bias plus at most a tenth of the signal plus read noise.
    assert (dead <= params.bias_dn + 0.1 * (clean_dead - params.bias_dn) + 6 * read_dn + 1).all()
    assert (dead >= params.bias_dn - 6 * read_dn - 1).all()
    assert (frame.defect_mask[layout.dead_pixels[:, 0], layout.dead_pixels[:, 1]] & DEAD).all()

    stuck = layout.stuck_pixels
    assert len(stuck) > 3 and len(layout.warm_pixels) > 3
    np.testing.assert_array_equal(frame.noisy[stuck[:, 0], stuck[:, 1]], np.rint(layout.stuck_dn))
    assert (layout.stuck_dn >= 0.2 * params.adc_max).all()
    warm = layout.warm_pixels
    excess = frame.noisy[warm[:, 0], warm[:, 1]] - frame.clean[warm[:, 0], warm[:, 1]]
    assert (excess > 0.5 * layout.warm_offset_dn).all()
    assert (frame.defect_mask[warm[:, 0], warm[:, 1]] & HOT).all()


def test_dead_pixels_read_zero_without_bias() -> None:
    cfg = DefectConfig.noise_only(**{**FIXED, "bias_frac": (0.0, 0.0)},
                                  dead_pixel_probability=1.0, dead_pixel_frac=(3e-3, 3e-3),
                                  dead_pixel_response=(0.0, 0.0))
    params = _params(cfg, 12)
    frame = apply_detector(_flat(0.6), np.random.default_rng(3), params)
    dead = frame.layout.dead_pixels
    read_dn = params.read_noise_e / params.gain_e_per_dn
    assert frame.noisy[dead[:, 0], dead[:, 1]].max() <= 6 * read_dn


def _saturated_disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    return np.where(disc, np.float32(6.0), np.float32(0.05)).astype(np.float32)


def test_bloom_trails_run_along_columns_and_are_masked() -> None:
    signal = _saturated_disc((128, 96), (64, 40), 4.0)
    cfg = DefectConfig.noise_only(**FIXED, bloom_probability=1.0)
    params = _params(cfg, 12)
    frame = apply_detector(signal, np.random.default_rng(4), params)
    core = signal >= 1.0
    bloom = (frame.defect_mask & BLOOM) != 0
    assert bloom.sum() > 20
    assert not (bloom & core).any()  # the saturated core is real data
    assert not frame.defect_mask[core].any()
    rows, cols = np.nonzero(bloom)
    core_cols = np.flatnonzero(core.any(axis=0))
    assert set(cols) <= set(core_cols)  # vertical: only the core's columns
    core_rows = np.flatnonzero(core.any(axis=1))
    assert (rows < core_rows.min()).any() and (rows > core_rows.max()).any()  # up and down
    # Charge is conserved: the trail holds the excess (none of it leaves this frame).
    full = params.saturation_dn - params.bias_dn
    excess_dn = float(((signal[core] - 1.0) * full).sum())
    trail_dn = float((frame.noisy[bloom] - frame.clean[bloom]).sum())
    assert trail_dn == pytest.approx(excess_dn, rel=0.05)
    # A trail pixel reads like a saturated one.
    assert np.median(frame.noisy[bloom]) > 0.9 * params.saturation_dn


def test_anti_blooming_sensor_drains_the_excess() -> None:
    signal = _saturated_disc((96, 96), (48, 48), 4.0)
    params = _params(DefectConfig.noise_only(**FIXED), 12)
    assert not params.bloom
    frame = apply_detector(signal, np.random.default_rng(4), params)
    assert not frame.defect_mask.any()
    outside = signal < 1.0
    assert frame.noisy[outside].max() < 0.2 * params.saturation_dn


def test_radiation_tracks_are_elongated() -> None:
    cfg = DefectConfig.noise_only(
        **FIXED, radiation_probability=1.0, radiation_hits_per_mpx=(2000.0, 2000.0),
        radiation_track_share=1.0, radiation_track_length_px=(20.0, 30.0),
        radiation_charge_full_wells=(0.5, 1.0),
    )
    frame = apply_detector(_flat(0.1), np.random.default_rng(5), _params(cfg, 16))
    labels, n = ndimage.label((frame.defect_mask & RADIATION) != 0, structure=np.ones((3, 3)))
    assert n >= 5
    extents = [max(s[0].stop - s[0].start, s[1].stop - s[1].start)
               for s in ndimage.find_objects(labels)]
    assert max(extents) >= 12


def test_mask_marks_the_pixels_that_differ_from_the_noise_model() -> None:
    """Loosely: masked pixels deviate beyond the noise, unmasked ones almost never do."""
    cfg = DefectConfig.all_defects(**FIXED)
    outliers_unmasked, n_unmasked = 0, 0
    deviating = dict.fromkeys(MASK_BITS.values(), 0)
    marked = dict.fromkeys(MASK_BITS.values(), 0)
    for index in range(4):
        params = _params(cfg, 16, seed=index)
        frame = apply_detector(_flat(0.4), np.random.default_rng(10 + index), params)
        g = params.gain_e_per_dn
        sigma = np.sqrt((0.4 * params.full_well_e + params.read_noise_e**2) / g**2 + 1 / 12)
        z = np.abs(frame.noisy - frame.clean) / sigma
        masked = frame.defect_mask > 0
        outliers_unmasked += int((z[~masked] > 5).sum())
        n_unmasked += int((~masked).sum())
        for bit in MASK_BITS.values():
            in_class = (frame.defect_mask & bit) != 0
            deviating[bit] += int((z[in_class] > 2).sum())
            marked[bit] += int(in_class.sum())
    assert outliers_unmasked <= 1e-4 * n_unmasked
    for bit in MASK_BITS.values():
        assert marked[bit] >= 20, bit
        assert deviating[bit] >= 0.95 * marked[bit], (bit, deviating[bit], marked[bit])


def test_fixed_layout_keeps_the_same_damage_across_frames() -> None:
    cfg = DefectConfig.all_defects(**FIXED)
    params = _params(cfg, 12)
    layout = sample_defect_layout(np.random.default_rng(7), params, 64, 80)
    static = DEAD | HOT | BAD_LINE
    a = apply_detector(_flat(0.3, (64, 80)), np.random.default_rng(1), params, layout)
    b = apply_detector(_flat(0.3, (64, 80)), np.random.default_rng(2), params, layout)
    np.testing.assert_array_equal(a.defect_mask & static, b.defect_mask & static)
    np.testing.assert_array_equal(a.defect_mask & static, layout.static_mask())
    assert not np.array_equal(a.noisy, b.noisy)  # fresh noise and events each frame
    assert a.layout is layout
    with pytest.raises(ValueError, match="layout is for 64x80"):
        apply_detector(_flat(0.3, (64, 64)), np.random.default_rng(1), params, layout)


def test_bad_lines_are_lines() -> None:
    cfg = DefectConfig.noise_only(**FIXED, bad_line_probability=1.0, partial_line_share=0.0)
    params = _params(cfg, 12)
    frame = apply_detector(_flat(0.5, (64, 64)), np.random.default_rng(8), params)
    assert frame.layout.bad_lines
    bad = (frame.defect_mask & BAD_LINE) != 0
    full_cols = bad.all(axis=0).sum()
    full_rows = bad.all(axis=1).sum()
    expected = params.dead_columns + params.hot_columns, params.dead_rows + params.hot_rows
    assert (full_cols, full_rows) <= expected and full_cols + full_rows >= 1
    assert bad.sum() <= 64 * (sum(expected))


def test_glints_are_masked_and_saturate() -> None:
    cfg = DefectConfig.noise_only(**FIXED, saturated_blob_probability=1.0)
    params = _params(cfg, 12)
    frame = apply_detector(_flat(0.1, (96, 96)), np.random.default_rng(9), params)
    blob = (frame.defect_mask & SATURATED_BLOB) != 0
    assert blob.any()
    read_dn = params.read_noise_e / params.gain_e_per_dn
    assert frame.noisy[blob].max() >= params.saturation_dn - 5 * read_dn


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="bit_depth"):
        sample_defect_params(np.random.default_rng(0), None, 10)
    with pytest.raises(ValidationError):
        DefectConfig(dead_pixel_probability=1.5)
    with pytest.raises(ValidationError):
        DefectConfig(dead_columns=(3, 1))
    params = _params(DefectConfig(), 8)
    with pytest.raises(ValueError, match="2-D"):
        apply_detector(np.zeros(10, np.float32), np.random.default_rng(0), params)
    with pytest.raises(ValueError, match=">= 0"):
        apply_detector(np.full((8, 8), -1.0, np.float32), np.random.default_rng(0), params)


@pytest.mark.parametrize("share,lo,hi", [(0.0, 0.0, 0.02), (1.0, 0.9, 1.0)])
def test_radiation_tracks_are_told_from_spots_by_shape(share: float, lo: float, hi: float) -> None:
    from cdae.training.defects import radiation_tracks

    cfg = DefectConfig(radiation_probability=1.0, radiation_track_share=share, radiation_hits_per_mpx=(300.0, 600.0))
    rad = tracks = 0
    for index in range(24):
        _, frame = simulate_frame(11, index, 128, 128, 12, defect_config=cfg)
        found = radiation_tracks(frame.defect_mask)
        assert not (found & ((frame.defect_mask & RADIATION) == 0)).any()  # only radiation pixels
        rad += int(((frame.defect_mask & RADIATION) != 0).sum())
        tracks += int(found.sum())
    assert rad > 200 and lo <= tracks / rad <= hi
