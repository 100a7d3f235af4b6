"""Real-scene evaluation (training/real_scenes.py): frames from photographs through the project's camera,
and the scoring that must catch a filter that paints over bright structure or flags real light."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cdae.engine.guard import GuardConfig
from cdae.training.defects import BAD_LINE, DEAD, HOT
from cdae.training.real_scenes import (
    NOISY,
    build_frames,
    camera_guard_method,
    evaluate_real_scenes,
    guard_method,
    load_real_images,
    noisy_method,
    score_methods,
    synthetic_real_like,
)

ROOT = Path(__file__).resolve().parents[2]
HAVE_REAL = all(importlib.util.find_spec(m) is not None for m in ("pywt", "sklearn"))


def test_frames_are_deterministic_and_share_the_camera() -> None:
    img = synthetic_real_like(96)
    a = build_frames([img], seed=3, exposures=(0.3,))
    b = build_frames([img], seed=3, exposures=(0.3,))
    assert [f.kind for f in a] == ["noise-only", "defects"]
    for x, y in zip(a, b):
        assert np.array_equal(x.noisy, y.noisy) and np.array_equal(x.defect_mask, y.defect_mask)
    noise, defects = a
    assert not noise.defect_mask.any()  # every pixel is real light
    assert noise.camera == defects.camera  # same gain, read noise, bias, full well: only the defects differ
    for bit in (DEAD, HOT, BAD_LINE):  # each restorable class is there to be measured (radiation: up to
        assert (defects.defect_mask & bit).any()  # 300 hits per megapixel, so perhaps none on a small frame)


def test_painting_over_a_bright_structure_is_caught_on_its_frame() -> None:
    """A filter that erases the brightest real structure of one frame only: that frame's bright-feature
    RMSE is far over 1.5x the noisy input's and it is counted, whatever the pooled numbers say."""
    frames = build_frames([synthetic_real_like(128)], exposures=(0.2, 0.5), kinds=("noise-only",))
    calls = {"n": 0}

    def paint_first(noisy: np.ndarray, adc_max: int) -> tuple[np.ndarray, None]:
        calls["n"] += 1
        out = np.asarray(noisy, np.float32).copy()
        if calls["n"] == 1:
            top = np.percentile(out, 97)
            out[out > top] = np.median(out)
        return out, None

    summary, per = score_methods(frames, {NOISY: noisy_method(), "painter": paint_first})
    ratios = [r["bright_ratio"] for r in per["painter"]]
    assert ratios[0] > 1.5 and ratios[1] == pytest.approx(1.0)
    assert summary["painter"]["frames_bright_over_1.5x"] == 1
    assert summary[NOISY]["frames_bright_over_1.5x"] == 0 and summary[NOISY]["bright_ratio_max"] == pytest.approx(1.0)


def test_identity_network_with_the_guard_flags_almost_no_real_light() -> None:
    frames = build_frames([synthetic_real_like(128, seed=s) for s in (0, 1)], kinds=("noise-only",))
    summary, per = score_methods(frames, {"identity + guard": guard_method(lambda x, a: x, GuardConfig(k_sigma=1.0))})
    s = summary["identity + guard"]
    assert s["false_flag_share"] is not None and s["false_flag_share"] < 1e-3
    assert s["frames_bright_over_1.5x"] == 0  # the raw frame, bounded: nothing painted over


def test_flags_on_real_bright_structure_are_the_calibrated_loss() -> None:
    """The share of a frame's real bright-feature pixels flagged (what `cdae calibrate` bounds): a method that
    flags every bright pixel of the first frame and nothing else scores 1 there, 0 on the second, 0.5 on average;
    an impulse flag counts as much as a learned one."""
    from cdae.engine.guard import IMPULSE, LEARNED
    from cdae.training.metrics import bright_feature_mask

    frames = build_frames([synthetic_real_like(128)], exposures=(0.2, 0.5), kinds=("noise-only",))
    calls = {"n": 0}

    def flag_bright_first(noisy: np.ndarray, adc_max: int) -> tuple[np.ndarray, np.ndarray]:
        fr = frames[calls["n"]]
        calls["n"] += 1
        flags = np.zeros(noisy.shape, np.uint8)
        if calls["n"] == 1:
            bright = bright_feature_mask(fr.clean, fr.defect_mask)
            flags[bright] = LEARNED
            flags.flat[np.flatnonzero(bright)[::2]] = IMPULSE
        return np.asarray(noisy, np.float32), flags

    summary, per = score_methods(frames, {"flagger": flag_bright_first})
    assert per["flagger"][0]["n_bright"] > 0
    assert per["flagger"][0]["bright_flag_share"] == pytest.approx(1.0)
    assert 0.4 < per["flagger"][0]["bright_learned_share"] < 0.6  # every other one an impulse instead
    assert per["flagger"][1]["bright_flag_share"] == 0.0
    assert summary["flagger"]["bright_flag_share_mean"] == pytest.approx(0.5)
    assert summary["flagger"]["false_flag_share"] > 0


def test_told_the_camera_the_guard_holds_every_unflagged_pixel_to_its_noise() -> None:
    """With the camera's gain, read noise and bias given, an unflagged pixel moves at most k sigma of the
    camera's true noise, whatever the network does (here: a wild one)."""
    from cdae.engine.inference import Denoiser

    frames = build_frames([synthetic_real_like(96)], exposures=(0.3, 2.0), kinds=("noise-only",))
    den = Denoiser.from_package(ROOT / "models" / "cdae-default" / "7")
    method = camera_guard_method(den, GuardConfig(k_sigma=1.0))
    for fr in frames:
        est, flags = method(fr.noisy, fr.adc_max, fr)
        cam = fr.camera
        sigma = np.sqrt((cam["read_noise_e"] / cam["gain_e_per_dn"]) ** 2 + 1 / 12
                        + np.maximum(fr.noisy - cam["bias_dn"], 0) / cam["gain_e_per_dn"])
        free = flags == 0
        assert (np.abs(est - fr.noisy)[free] <= sigma[free] + 0.5 + 1e-3).all()  # + the camera dtype's rounding


@pytest.mark.skipif(not HAVE_REAL, reason="PyWavelets and scikit-learn (the 'real' extra) are not installed")
def test_package_images_exclude_the_reserved_ones() -> None:
    images = load_real_images()
    assert [i.name for i in images] == ["ascent", "aero", "china", "flower"]  # not pywt's camera (scikit-image's)
    for im in images:
        assert im.image.ndim == 2 and 0.0 <= float(im.image.min()) and float(im.image.max()) <= 1.0
        assert "skimage" not in im.source and "matplotlib" not in im.source


def test_report_on_the_shipped_model(tmp_path: Path) -> None:
    """The whole evaluation on one small synthetic image: report.json, report.md and the worst frame's panel."""
    pkg = ROOT / "models" / "cdae-default" / "7"
    report = evaluate_real_scenes("cdae-default:7", pkg, tmp_path, images=[synthetic_real_like(64)],
                                  exposures=(0.3,), reference_frames=1, log=lambda s: None)
    assert {p.name for p in tmp_path.iterdir()} >= {"report.json", "report.md", "worst.png", "worst-psnr.png"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["sets"]) == {"noise-only", "defects"}
    for name, t in report["targets"].items():
        assert set(t["defect_ratio_to_median_by_class"]) >= {"dead", "hot", "bad_line"}
        assert t["meets_all"] in (True, False)
    # :7 carries a calibration: the false-flag target is its rate on real bright pixels, the reference beside it
    cal = json.loads((pkg / "guard-calibration.json").read_text())
    assert data["calibration"]["alpha"] == cal["alpha"]
    guarded = [n for n in report["targets"] if "guard" in n]
    assert any(f"head>{cal['defect_threshold']:g}" in n for n in guarded)  # the variant at the calibrated threshold
    for name in guarded:
        t = report["targets"][name]
        assert t["calibrated_rate"] == cal["alpha"]
        assert t["false_flag_ok"] == (t["bright_flag_share_noise_only"] <= cal["alpha"])
    assert "calibrated rate" in (tmp_path / "report.md").read_text()
    assert "| method |" in (tmp_path / "report.md").read_text()
