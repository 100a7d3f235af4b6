"""Tests of cdae.training.baselines: each filter does its job and tuning picks fairly."""

from __future__ import annotations

import numpy as np
import pytest

from cdae.training.baselines import (
    BASELINE_GRID,
    Baseline,
    BaselineError,
    gaussian_filter,
    make_baseline,
    median_filter,
    score_baselines,
    tune_baselines,
)
from cdae.training.metrics import EvalFrame

ADC_MAX = 4095


def _smooth_scene(shape: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    """Broad blobs on a background: smooth enough that a blur loses little signal."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    scene = np.full(shape, 500.0)
    for _ in range(4):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        scene += 1500.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
    return scene.astype(np.float32)


def _frames(noise: str, n: int = 3) -> list[EvalFrame]:
    frames = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        clean = _smooth_scene(seed=i)
        if noise == "salt":
            noisy = clean.copy()
            hit = rng.random(clean.shape) < 0.05
            noisy[hit] = ADC_MAX  # saturated hot pixels / zingers
        else:
            noisy = clean + rng.normal(0, 80, clean.shape).astype(np.float32)
        frames.append(
            EvalFrame(noisy=np.clip(noisy, 0, ADC_MAX).astype(np.float32), clean=clean,
                      defect_mask=np.zeros(clean.shape, np.uint8), adc_max=ADC_MAX, bit_depth=12, kind=noise)
        )
    return frames


def test_median3_removes_an_isolated_hot_pixel() -> None:
    frame = np.full((9, 9), 100.0, np.float32)
    frame[4, 4] = 4095.0
    out = median_filter(frame, 3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.full((9, 9), 100.0, np.float32))


def test_gaussian_blurs_a_point_source_and_keeps_its_flux() -> None:
    frame = np.zeros((21, 21), np.float32)
    frame[10, 10] = 1000.0
    out = gaussian_filter(frame, 1.5)
    assert out.dtype == np.float32
    assert out[10, 10] < 1000.0 * 0.2  # peak spread over ~2 pi sigma^2 pixels
    assert out[10, 12] > 0.0
    assert out.sum() == pytest.approx(1000.0, rel=1e-5)
    assert np.unravel_index(np.argmax(out), out.shape) == (10, 10)


def test_reflect_borders_keep_a_flat_frame_flat() -> None:
    frame = np.full((7, 11), 321.0, np.float32)
    np.testing.assert_allclose(gaussian_filter(frame, 3.0), frame, rtol=1e-6)
    np.testing.assert_array_equal(median_filter(frame, 7), frame)


def test_filters_refuse_a_stack_and_bad_parameters() -> None:
    with pytest.raises(BaselineError, match=r"2-D frame.*\(2, 5, 5\)"):
        median_filter(np.zeros((2, 5, 5)), 3)
    with pytest.raises(BaselineError, match="odd"):
        median_filter(np.zeros((5, 5)), 4)
    with pytest.raises(BaselineError, match="sigma"):
        gaussian_filter(np.zeros((5, 5)), 0.0)


def test_make_baseline_parses_names() -> None:
    assert make_baseline("median3") == Baseline("median", 3.0)
    assert make_baseline("gaussian1.5") == Baseline("gaussian", 1.5)
    assert make_baseline("gaussian1").name == "gaussian1.0"
    assert [b.name for b in BASELINE_GRID] == [
        "median3", "median5", "median7",
        "gaussian0.5", "gaussian0.75", "gaussian1.0", "gaussian1.5", "gaussian2.0", "gaussian3.0",
    ]
    for b in BASELINE_GRID:
        assert make_baseline(b.name) == b
    for bad in ("median4", "median", "gaussian", "gaussian0", "box3", "median3x3"):
        with pytest.raises(BaselineError, match=repr(bad)):
            make_baseline(bad)
    with pytest.raises(BaselineError, match="family"):
        Baseline("box", 3.0)


def test_baseline_output_is_float32_and_clipped_to_the_adc_range() -> None:
    noisy = np.full((8, 8), 300.0, np.float32)
    noisy[::2] = 5000.0  # beyond a 12-bit ADC, e.g. after an offset correction
    out = make_baseline("gaussian1.0")(noisy, ADC_MAX)
    assert out.dtype == np.float32
    assert out.max() <= ADC_MAX
    assert out.min() >= 0


def test_tuning_picks_median_for_salt_noise_and_gaussian_for_gaussian_noise() -> None:
    salt = _frames("salt")
    gauss = _frames("gaussian")
    salt_scores = score_baselines(salt, BASELINE_GRID)
    gauss_scores = score_baselines(gauss, BASELINE_GRID)
    assert max(salt_scores, key=salt_scores.__getitem__).startswith("median")
    assert max(gauss_scores, key=gauss_scores.__getitem__).startswith("gaussian")

    best_salt = tune_baselines(salt)
    assert set(best_salt) == {"median", "gaussian"}
    assert salt_scores[best_salt["median"]] == max(v for k, v in salt_scores.items() if k.startswith("median"))
    assert best_salt["median"] != "median7"  # the largest window erases the blobs' shape
    best_gauss = tune_baselines(gauss, families=("gaussian",))
    assert best_gauss["gaussian"] != "gaussian0.5"  # 80 DN noise needs more than a touch
    assert gauss_scores[best_gauss["gaussian"]] == max(
        v for k, v in gauss_scores.items() if k.startswith("gaussian")
    )


def test_tuning_rejects_empty_sets_and_unknown_families() -> None:
    with pytest.raises(BaselineError, match="validation frame"):
        tune_baselines([])
    with pytest.raises(BaselineError, match="'box'"):
        tune_baselines(_frames("gaussian", n=1), families=("box",))
