"""Done when: fine-tuning cannot ship a regression (issue 16).

The camera: a static ring-and-bar-chart target (a scene kind the training generator never draws),
drawn with numpy and recorded through the project's camera model (:func:`apply_detector`): fresh
noise, radiation hits and saturating glints in every frame, a hot column. Its truth (the noiseless
frame) is known here, for the judgement only: the evaluation and the fine-tune see nothing but the
recorded frames.

1. the no-ground-truth report is finite on the static scene and agrees with the truth (it was
   ``nan``: every pair, with its glints, looked like a moving scene); a moving scene says why there
   is no estimate;
2. a fine-tune made worse on purpose (learning rate ten times the default) is refused: non-zero
   exit, one line of reason, nothing in the model store, the report kept in the run folder and
   marked; ``--force`` stores it, marked;
3. a fine-tune that is not worse (a tenth of the default learning rate) is stored.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cdae.engine.inference import Denoiser
from cdae.engine.package import ModelRegistry, read_manifest
from cdae.recording import RunInfo, RunWriter
from cdae.training.characterise import characterise, default_profile_path, load_profile
from cdae.training.defects import DefectConfig, apply_detector, detector_rng, sample_defect_layout, sample_defect_params
from cdae.training.evaluate_real import evaluate_recording, held_out_frames, static_pairs
from cdae.training.simulate import SCENE_KINDS
from ioc_helpers import cdae

SIZE, LIGHT, DARK, SEED = 64, 24, 4, 5
PARENT = "cdae-default:7"
SHIPPED = Path(__file__).resolve().parents[2] / "models"
#: a fine-tune of the shipped model that runs in seconds: 2 steps of 4 patches
TINY = ["data.patch_size=32", "data.frames_per_epoch=8", "optim.batch_size=4", "optim.epochs=1",
        "optim.warmup_steps=1", "data.val_frames=4", "data.val_size=32", "threads=1"]
WORSE = ["optim.lr=3e-3"]  # ten times the default: two steps throw the parent's weights away
GENTLE = ["optim.lr=3e-5", "optim.min_lr=1e-6"]


def ring_target(h: int, w: int) -> np.ndarray:
    """Two rings and a bar chart on a faint gradient: relative intensity, up to 0.85 of full well."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(y - (h - 1) / 2, x - (w - 1) / 2)
    s = 0.05 + 0.02 * x / w
    for r0, width, amp in ((0.36 * min(h, w), 2.5, 0.8), (0.18 * min(h, w), 1.5, 0.5)):
        s += amp * np.exp(-0.5 * ((r - r0) / width) ** 2)
    s += 0.3 * ((np.sin(np.pi * x / 3) > 0) & (y > 0.8 * h) & (y < 0.9 * h) & (x > 0.2 * w) & (x < 0.6 * w))
    return s.astype(np.float32)


def record_ring_camera(path: Path, static: bool = True) -> np.ndarray:
    """Dark frames, then ``LIGHT`` frames of the target (shifted by a pixel a frame unless ``static``);
    returns the noiseless frame of the static target."""
    cfg = DefectConfig(saturated_blob_probability=1.0, radiation_probability=1.0, bad_line_probability=1.0,
                       hot_columns=(1, 1), dead_columns=(0, 0), dead_rows=(0, 0), hot_rows=(0, 0),
                       hot_pixel_probability=0.0, dead_pixel_probability=0.0, bloom_probability=0.0)
    rng = detector_rng(SEED, 0)
    # no fixed pattern (PRNU, DSNU): the noiseless frame is then what a static scene's frames average to
    params = sample_defect_params(rng, cfg, 12).model_copy(
        update={"exposure_scale": 1.0, "read_noise_e": 20.0, "prnu_frac": 0.0, "dsnu_dn": 0.0})
    assert params.saturated_blobs > 0 and params.radiation_hits_per_mpx > 0  # fresh events in every frame
    layout = sample_defect_layout(rng, params, SIZE, SIZE)
    target = ring_target(SIZE, SIZE)
    for dark, count in ((True, DARK), (False, LIGHT)):
        info = RunInfo(source="RING:image1:", dark=dark, data_type="UInt16", bit_depth=12, height=SIZE, width=SIZE,
                       frames_requested=count, bit_depth_source="user")
        p = params.model_copy(update={"saturated_blobs": 0}) if dark else params
        with RunWriter(path, info, np.uint16) as w:
            for i in range(count):
                signal = np.zeros_like(target) if dark else (target if static else np.roll(target, i, axis=1))
                det = apply_detector(signal, detector_rng(SEED, 1 + i + (10**6 if dark else 0)), p, layout)
                w.append(det.noisy.astype(np.uint16), i + 1, (i, 0), float(i))
            w.close("recorded all frames", complete=True)
    return apply_detector(target, detector_rng(SEED, 1), params, layout).clean


@pytest.fixture(scope="module")
def ring_camera(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("ring") / "ring.h5"
    clean = record_ring_camera(path)
    characterise(path).save(default_profile_path(path))
    return path, clean


def _true_mse(pkg: Path, recording: Path, clean: np.ndarray) -> tuple[float, float]:
    """MSE against the truth of a model's output on the held-out frames, on the pixels the estimate uses
    (all kept, bright kept)."""
    profile = load_profile(default_profile_path(recording))
    frames = held_out_frames(recording, profile, LIGHT // 4)
    den = Denoiser.from_package(pkg)
    out = [np.clip(den.denoise_dn(x, 4095.0)[0], 0, 4095) for x in frames[0]]
    pairs = static_pairs(frames, profile, profile.defect_mask())
    err = [[((out[p.i + k] - clean) ** 2)[m] for k in (0, 1)] for p in pairs for m in (p.keep, p.bright)]
    return (float(np.mean([np.mean(e) for e in err[0::2]])), float(np.mean([np.mean(e) for e in err[1::2]])))


def _finetune(recording: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [a for a in extra if a.startswith("--")]
    sets = [a for s in [*TINY, *(e for e in extra if not e.startswith("--"))] for a in ("--set", s)]
    return subprocess.run(cdae("finetune", "--init", PARENT, "--models-dir", str(SHIPPED), "--out",
                               str(tmp_path / "store"), "--data", str(recording), "--run-dir", str(tmp_path / "runs"),
                               "--eval-frames", "2", "--no-progress", *sets, *flags),
                          capture_output=True, text=True, timeout=600, env={**os.environ})


def test_the_scene_is_one_the_generator_never_draws() -> None:
    assert not {"ring", "rings", "annulus", "chart", "bars"} & set(SCENE_KINDS)


def test_no_ground_truth_estimate_on_a_static_scene_with_events(ring_camera: tuple[Path, np.ndarray],
                                                                tmp_path: Path) -> None:
    recording, clean = ring_camera
    profile = load_profile(default_profile_path(recording))
    assert [(b.axis, b.kind) for b in profile.bad_lines] == [("column", "hot")]
    parent = Denoiser.from_package(SHIPPED / "cdae-default" / "7")
    frames = held_out_frames(recording, profile, LIGHT // 4)
    report = evaluate_recording([(PARENT, parent)], frames, profile, tmp_path / "ev", log=lambda s: None)
    assert report["static_pairs"] >= 4 and report["no_estimate_reason"] is None
    s = report["summary"][PARENT]
    assert math.isfinite(s["estimated_psnr_db"]) and math.isfinite(s["agreement_rmse_dn"])
    # and it is right: the estimate against the next frame matches the error against the truth
    true_all, true_bright = _true_mse(SHIPPED / "cdae-default" / "7", recording, clean)
    assert 10 ** (-s["estimated_psnr_db"] / 10) * 4095**2 == pytest.approx(true_all, rel=0.15)
    assert s["estimated_bright_rmse_dn"] == pytest.approx(math.sqrt(true_bright), rel=0.1)
    noisy = report["summary"]["noisy input"]["estimated_psnr_db"]
    pairs = static_pairs(frames, profile, profile.defect_mask())
    true_noise = np.mean([np.mean(((frames[0][p.i] - clean) ** 2)[p.keep]) for p in pairs])
    assert 10 ** (-noisy / 10) * 4095**2 == pytest.approx(true_noise, rel=0.15)  # the noise itself

    # a moving scene: no estimate, and the report says why (not a silent nan)
    moving = tmp_path / "moving.h5"
    record_ring_camera(moving, static=False)
    report = evaluate_recording([(PARENT, parent)], held_out_frames(moving, profile, LIGHT // 4), profile,
                                tmp_path / "ev-moving", log=lambda s: None)
    assert report["static_pairs"] == 0 and "static scene" in report["no_estimate_reason"]
    assert report["real"][PARENT]["no_estimate"] == report["no_estimate_reason"]
    assert "No error estimate" in (tmp_path / "ev-moving" / "report.md").read_text()


def test_a_worse_finetune_is_refused(ring_camera: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    recording, clean = ring_camera
    r = _finetune(recording, tmp_path, *WORSE)
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = [s for s in r.stderr.splitlines() if s.strip()]
    assert line.startswith("cdae finetune: refused: cdae-default:7-ft1 is worse than its parent cdae-default:7")
    assert "Traceback" not in r.stderr
    assert ModelRegistry(tmp_path / "store").refs() == []  # nothing servable
    (candidate,) = (tmp_path / "runs").glob("*/candidate/cdae-default/7-ft1")
    gate = read_manifest(candidate).metrics["finetune_gate"]
    assert gate["verdict"] == "refused" and "estimated error on the held-out frames" in gate["reason"]
    report = json.loads((candidate / "real-evaluation" / "report.json").read_text())
    comp = report["comparison"]["metrics"]["all"]
    assert comp["delta_low_dn2"] > 0.02 * comp["parent_mse_dn2"]
    assert "FINE-TUNE REFUSED" in (candidate / "real-evaluation" / "report.md").read_text()
    # the truth agrees: the child is worse
    assert _true_mse(candidate, recording, clean)[0] > 2 * _true_mse(SHIPPED / "cdae-default" / "7", recording, clean)[0]

    forced = _finetune(recording, tmp_path, *WORSE, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning: forced" in forced.stderr
    assert ModelRegistry(tmp_path / "store").refs() == ["cdae-default:7-ft1"]
    manifest = read_manifest(tmp_path / "store" / "cdae-default" / "7-ft1")
    assert manifest.metrics["finetune_gate"]["verdict"] == "forced" and "FINE-TUNE FORCED" in manifest.notes


def test_a_finetune_that_is_not_worse_is_stored(ring_camera: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    recording, clean = ring_camera
    r = _finetune(recording, tmp_path, *GENTLE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ModelRegistry(tmp_path / "store").refs() == ["cdae-default:7-ft1"]
    pkg = tmp_path / "store" / "cdae-default" / "7-ft1"
    manifest = read_manifest(pkg)
    assert manifest.metrics["finetune_gate"]["verdict"] == "accepted" and "FINE-TUNE" not in manifest.notes
    assert not list((tmp_path / "runs").glob("*/candidate/cdae-default/7-ft1"))  # moved into the store
    report = json.loads((pkg / "real-evaluation" / "report.json").read_text())
    assert report["gate"]["verdict"] == "accepted"
    child, parent = _true_mse(pkg, recording, clean)[0], _true_mse(SHIPPED / "cdae-default" / "7", recording, clean)[0]
    assert child <= 1.02 * parent
