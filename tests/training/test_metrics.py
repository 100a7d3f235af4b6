"""Tests of cdae.training.metrics: formulas checked by hand and against a brute-force SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdae.training.metrics import (
    EvalFrame,
    FrameMetrics,
    MetricsError,
    aggregate,
    bright_feature_mask,
    frame_metrics,
    psnr,
    rmse,
    rmse_normalised,
    ssim,
)

ADC_MAX = 4095


def _scene(shape: tuple[int, int] = (48, 40), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    scene = 200.0 + 800.0 * np.exp(-((yy - 20) ** 2 + (xx - 15) ** 2) / 30.0)
    return (scene + rng.normal(0, 20, shape)).astype(np.float32)


def test_psnr_of_known_mse_matches_formula() -> None:
    clean = np.full((10, 10), 100.0)
    estimate = clean.copy()
    estimate[0, :] += 10.0  # 10 of 100 pixels off by 10 DN: MSE = 10
    assert psnr(estimate, clean, 255) == pytest.approx(10 * math.log10(255**2 / 10.0))


def test_psnr_is_infinite_for_an_exact_estimate() -> None:
    clean = _scene()
    assert psnr(clean, clean, ADC_MAX) == math.inf


def test_psnr_uses_data_range_not_frame_content() -> None:
    clean = np.zeros((8, 8))
    estimate = np.ones((8, 8))
    assert psnr(estimate, clean, 1023) - psnr(estimate, clean, 255) == pytest.approx(
        20 * math.log10(1023 / 255)
    )


def test_shape_mismatch_and_bad_range_raise() -> None:
    with pytest.raises(MetricsError, match=r"\(4, 4\) and \(4, 5\)"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)), 255)
    with pytest.raises(MetricsError, match="data_range"):
        psnr(np.zeros((4, 4)), np.zeros((4, 4)), 0)
    with pytest.raises(MetricsError, match="11x11"):
        ssim(np.zeros((8, 30)), np.zeros((8, 30)), 255)


def test_ssim_of_identical_frames_is_one() -> None:
    clean = _scene()
    assert ssim(clean, clean, ADC_MAX) == pytest.approx(1.0)


def test_ssim_of_constant_frames_is_the_luminance_term() -> None:
    a, b, rng = 100.0, 140.0, 255.0
    c1 = (0.01 * rng) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(np.full((20, 20), a), np.full((20, 20), b), rng) == pytest.approx(expected, rel=1e-9)


def _ssim_brute_force(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. 2004 evaluated window by window with an explicit 11x11 Gaussian."""
    r, sigma = 5, 1.5
    g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    g /= g.sum()
    w = np.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(r, x.shape[0] - r):
        for j in range(r, x.shape[1] - r):
            px = x[i - r : i + r + 1, j - r : j + r + 1]
            py = y[i - r : i + r + 1, j - r : j + r + 1]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_window_by_window_definition() -> None:
    rng = np.random.default_rng(3)
    clean = _scene((20, 23)).astype(np.float64)
    noisy = clean + rng.normal(0, 60, clean.shape)
    assert ssim(noisy, clean, ADC_MAX) == pytest.approx(_ssim_brute_force(noisy, clean, ADC_MAX), rel=1e-9)


def test_ssim_decreases_with_noise_and_is_symmetric() -> None:
    rng = np.random.default_rng(1)
    clean = _scene().astype(np.float64)
    scores = [ssim(clean + rng.normal(0, s, clean.shape), clean, ADC_MAX) for s in (5, 30, 150)]
    assert scores[0] > scores[1] > scores[2]
    noisy = clean + rng.normal(0, 30, clean.shape)
    assert ssim(noisy, clean, ADC_MAX) == pytest.approx(ssim(clean, noisy, ADC_MAX))


def test_rmse_with_and_without_mask() -> None:
    clean = np.zeros((4, 4))
    estimate = np.zeros((4, 4))
    estimate[0, 0] = 4.0
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, :2] = 1
    assert rmse(estimate, clean) == pytest.approx(1.0)  # sqrt(16 / 16)
    assert rmse(estimate, clean, mask) == pytest.approx(math.sqrt(8.0))  # sqrt(16 / 2)
    assert math.isnan(rmse(estimate, clean, np.zeros((4, 4), bool)))
    assert rmse_normalised(estimate, clean, 4.0) == pytest.approx(0.25)
    with pytest.raises(MetricsError, match="mask"):
        rmse(estimate, clean, np.zeros((3, 3), bool))


def test_bright_feature_mask_picks_bright_non_defect_pixels() -> None:
    clean = np.full((20, 20), 100.0)
    clean[5, 5] = clean[5, 6] = clean[6, 5] = clean[6, 6] = 3000.0
    defects = np.zeros((20, 20), np.uint8)
    defects[6, 6] = 1
    mask = bright_feature_mask(clean, defects, quantile=0.99)
    expected = np.zeros((20, 20), bool)
    expected[5, 5] = expected[5, 6] = expected[6, 5] = True
    np.testing.assert_array_equal(mask, expected)


def test_flat_frame_has_no_bright_features() -> None:
    clean = np.full((16, 16), 250.0)
    assert not bright_feature_mask(clean, np.zeros((16, 16), bool)).any()


def test_frame_metrics_regions() -> None:
    clean = np.full((24, 24), 100.0)
    clean[10:12, 10:12] = 2000.0
    defects = np.zeros((24, 24), np.uint8)
    defects[0, 0] = 1
    estimate = clean.copy()
    estimate[0, 0] += 409.5  # the defect left uncorrected: 0.1 of full scale
    estimate[10:12, 10:12] -= 204.75  # the bright feature dimmed by 0.05 of full scale
    m = frame_metrics(estimate, clean, defects, ADC_MAX)
    assert m.rmse_defect == pytest.approx(0.1)
    assert m.n_defect == 1
    assert m.rmse_bright == pytest.approx(0.05)
    assert m.n_bright == 4
    assert m.rmse_all == pytest.approx(math.sqrt((0.1**2 + 4 * 0.05**2) / 576))
    assert m.psnr_db == pytest.approx(psnr(estimate, clean, ADC_MAX))
    assert m.ssim < 1.0


def test_aggregate_pools_squared_errors_not_rmses() -> None:
    clean = np.full((16, 16), 100.0)
    d1 = np.zeros((16, 16), np.uint8)
    d1[0, 0] = 1  # one defect pixel, error 0.4 of full scale
    d2 = np.zeros((16, 16), np.uint8)
    d2[:, 0] = 1  # sixteen defect pixels, no error
    e1 = clean.copy()
    e1[0, 0] += 0.4 * ADC_MAX
    m1 = frame_metrics(e1, clean, d1, ADC_MAX)
    m2 = frame_metrics(clean + 1.0, clean, d2, ADC_MAX)
    m2_defect_se = 16 * (1.0 / ADC_MAX) ** 2
    agg = aggregate([m1, m2])
    assert agg["rmse_defect"] == pytest.approx(math.sqrt((0.4**2 + m2_defect_se) / 17))
    assert agg["rmse_defect"] != pytest.approx((m1.rmse_defect + m2.rmse_defect) / 2)
    assert agg["psnr_db"] == pytest.approx((m1.psnr_db + m2.psnr_db) / 2)
    assert agg["ssim"] == pytest.approx((m1.ssim + m2.ssim) / 2)
    assert agg["n_frames"] == 2
    assert agg["n_defect"] == 17
    assert math.isnan(agg["rmse_bright"])  # flat frames: no bright features anywhere
    with pytest.raises(MetricsError):
        aggregate([])


def test_frame_metrics_round_trips_through_json_with_nan_and_inf() -> None:
    clean = _scene()
    m = frame_metrics(clean + 3.0, clean, np.zeros(clean.shape, bool), ADC_MAX)
    back = FrameMetrics.model_validate_json(m.model_dump_json())
    assert back.rmse_all == pytest.approx(m.rmse_all)
    assert math.isnan(back.rmse_defect)  # no defects in this frame
    exact = FrameMetrics.model_validate_json(
        frame_metrics(clean, clean, np.zeros(clean.shape, bool), ADC_MAX).model_dump_json()
    )
    assert exact.psnr_db == math.inf


def test_eval_frame_holds_its_fields() -> None:
    clean = _scene()
    f = EvalFrame(noisy=clean, clean=clean, defect_mask=np.zeros(clean.shape, np.uint8),
                  adc_max=ADC_MAX, bit_depth=12, kind="gaussian-spots")
    assert f.adc_max == 2**f.bit_depth - 1


def test_per_class_rmse_counts_each_bit_and_pools_over_frames() -> None:
    from cdae.training.metrics import EvalFrame, per_class_rmse

    clean = np.zeros((4, 4), np.float32)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = 1  # dead
    mask[1, 1] = 2 | 8  # hot and bloom: counts in both
    est = clean.copy()
    est[0, 0], est[1, 1] = 10.0, 20.0
    frame = EvalFrame(noisy=est, clean=clean, defect_mask=mask, adc_max=100, bit_depth=8, kind="t")
    out = per_class_rmse([est, est], [frame, frame], {"dead": 1, "hot": 2, "bloom": 8, "none": 16})
    assert out["dead"] == {"rmse": pytest.approx(0.1), "pixels": 2.0}
    assert out["hot"]["rmse"] == pytest.approx(0.2) and out["bloom"]["rmse"] == pytest.approx(0.2)
    assert np.isnan(out["none"]["rmse"]) and out["none"]["pixels"] == 0.0


def test_bright_error_concentration_names_the_frame_that_holds_the_error() -> None:
    from cdae.training.metrics import bright_error_concentration, frame_metrics

    clean = np.zeros((32, 32), np.float32)
    clean[10:14, 10:14] = 80.0
    mask = np.zeros((32, 32), np.uint8)
    good = frame_metrics(clean + 0.5, clean, mask, 100.0)
    eaten = clean.copy()
    eaten[10:14, 10:14] = 5.0  # the bright feature removed
    bad = frame_metrics(eaten, clean, mask, 100.0)
    c = bright_error_concentration([good, bad, good])
    assert c["worst_frame"] == 1.0 and c["worst_frame_share"] > 0.99


def _fm(psnr_db: float, se_defect: float, se_bright: float) -> "FrameMetrics":
    from cdae.training.metrics import FrameMetrics

    return FrameMetrics(psnr_db=psnr_db, ssim=0.9, rmse_defect=math.sqrt(se_defect / 10), rmse_bright=math.sqrt(se_bright / 10),
                        rmse_all=0.0, se_defect=se_defect, n_defect=10, se_bright=se_bright, n_bright=10, se_all=0.0, n_all=100)


def test_bootstrap_of_the_targets_sees_a_rare_bad_frame() -> None:
    from cdae.training.metrics import MetricsError, bootstrap_targets, target_quantities

    noisy = [_fm(30.0, 1.0, 1.0) for _ in range(48)]
    baseline = [_fm(35.0, 1.0, 4.0) for _ in range(48)]
    good = [_fm(40.0, 0.04, 0.64) for _ in range(48)]  # +5 dB, 5x, 0.8x on every frame
    b = bootstrap_targets(good, baseline, noisy, resamples=500)
    assert b["psnr_gain_db"] == pytest.approx([5.0, 5.0, 5.0])
    assert b["defect_ratio"] == pytest.approx([5.0, 5.0, 5.0]) and b["bright_ratio"] == pytest.approx([0.8] * 3)
    assert b["share_meeting_all"] == 1.0 and b["frames"] == 48
    # one frame where the model paints over a real feature: the point estimate still passes,
    # but many resamples that draw it twice or more do not
    rare = [*good[:-1], _fm(40.0, 0.04, 12.0)]
    point = target_quantities(rare, baseline, noisy)
    assert point["bright_ratio"] < 1.0
    b = bootstrap_targets(rare, baseline, noisy, resamples=2000)
    assert b["bright_ratio"][2] > 1.0 and 0.0 < b["share_meeting_bright_ratio"] < 1.0
    assert b["share_meeting_all"] == b["share_meeting_bright_ratio"]
    assert bootstrap_targets(rare, baseline, noisy, resamples=2000) == b  # seeded: the same report twice
    with pytest.raises(MetricsError, match="same non-empty frames"):
        bootstrap_targets(rare, baseline[:3], noisy)


def test_painted_over_frames_counts_scenes_not_pooled_error() -> None:
    from cdae.training.metrics import painted_over_frames

    noisy = [1.0, 1.0, 1.0, 0.001, 1.0]
    # frame 1: 5x the noisy input's error (painted over); frame 3: 50x, but a negligible part of the
    # total (a speck on a dim frame); frame 4: 3x, within the factor
    method = [0.5, 5.0, 0.2, 0.05, 3.0]
    assert painted_over_frames(method, noisy) == [1]
    assert painted_over_frames([0.0] * 5, noisy) == []
    with pytest.raises(ValueError):
        painted_over_frames(method, noisy[:3])


def test_defects_frame_by_frame_shows_what_the_pooled_ratio_hides() -> None:
    from cdae.training.metrics import MetricsError, defects_frame_by_frame, target_quantities

    # two frames of glints (huge defect error, the model repairs them 10x better) and four plain
    # frames where the model is 2x worse than the baseline: pooled, the model looks far better
    baseline = [_fm(35.0, 100.0, 1.0), _fm(35.0, 100.0, 1.0)] + [_fm(35.0, 1.0, 1.0) for _ in range(4)]
    model = [_fm(40.0, 1.0, 1.0), _fm(40.0, 1.0, 1.0)] + [_fm(40.0, 4.0, 1.0) for _ in range(4)]
    sat = [True, True, False, False, False, False]
    assert target_quantities(model, baseline, baseline)["defect_ratio"] > 3.0
    f = defects_frame_by_frame(model, baseline, sat)
    assert f["pooled_ratio_with_saturation_artefacts"] == pytest.approx(10.0)
    assert f["pooled_ratio_without"] == pytest.approx(0.5)
    assert f["median_frame_ratio"] == pytest.approx(0.5)
    assert (f["frames_model_better"], f["frames_with_defects"]) == (2, 6)
    assert (f["frames_with_saturation_artefacts"], f["frames_without"]) == (2, 4)
    with pytest.raises(MetricsError, match="same frames"):
        defects_frame_by_frame(model, baseline[:3], sat)
