"""Evaluation against tuned baselines: the report's numbers are consistent and the files exist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cdae.engine.inference import Denoiser
from cdae.training.config import DataConfig
from cdae.training.evaluate import evaluate, identity, score
from cdae.training.dataset import simulated_frames


def test_evaluate_writes_report(tmp_path: Path, tiny_package: Path) -> None:
    den = Denoiser.from_package(tiny_package)
    report = evaluate([("tiny:1", den)], tmp_path / "eval", frames=6, val_frames=4, sizes=[(64, 64), (48, 80)],
                      timing=False, log=lambda s: None)
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["best_baseline"] == report["best_baseline"]
    assert set(saved["tuned_baselines"]) == {"median", "gaussian"}
    assert saved["best_baseline"] in saved["tuned_baselines"].values()
    methods = saved["methods"]
    assert {"noisy input", "tiny:1", saved["tuned_baselines"]["median"]} <= set(methods)
    c = saved["comparisons"]["tiny:1"]
    gain = methods["tiny:1"]["summary"]["psnr_db"] - methods[saved["best_baseline"]]["summary"]["psnr_db"]
    assert abs(c["psnr_gain_over_best_baseline_db"] - gain) < 1e-9
    assert isinstance(c["meets_targets"], bool)
    f = c["defects_frame_by_frame"]
    assert f["frames_with_saturation_artefacts"] + f["frames_without"] == f["frames_with_defects"] <= 6
    assert 0 <= f["frames_model_better"] <= f["frames_with_defects"]
    assert set(methods["tiny:1"]["per_defect_class_without_saturation_artefacts"]) == set(
        methods["tiny:1"]["per_defect_class"])
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "tiny:1" in md and "Targets met" in md and "Defect pixels frame by frame" in md
    assert (tmp_path / "eval" / "panels.png").stat().st_size > 5000


def test_held_out_stream_is_disjoint_and_reproducible() -> None:
    data = DataConfig()
    a = simulated_frames(data, data.test_seed, 0, 3, [(64, 64)])
    b = simulated_frames(data, data.test_seed, 0, 3, [(64, 64)])
    v = simulated_frames(data, data.val_seed, 0, 3, [(64, 64)])
    for x, y, z in zip(a, b, v):
        np.testing.assert_array_equal(x.noisy, y.noisy)
        assert not np.array_equal(x.clean, z.clean)


def test_identity_scores_match_the_noisy_input() -> None:
    frames = simulated_frames(DataConfig(), 3, 0, 4, [(64, 64)])
    s, outputs = score("noisy", identity, frames)
    assert s.summary["n_frames"] == 4 and all(o is f.noisy for o, f in zip(outputs, frames))


def test_evaluate_cli_changed_distribution_records_the_first_model_only(tmp_path: Path, tiny_package: Path) -> None:
    # `cdae evaluate --set` draws the held-out frames from a changed distribution (here generator
    # 1.1's unblurred plasma) and says so in the report; --update-manifest writes the metrics into
    # the model under evaluation, not into the ones it is compared with.
    import shutil
    import subprocess
    import sys

    from cdae.engine.package import read_manifest, write_manifest

    store = tiny_package.parent.parent
    second = tiny_package.parent / "2"
    shutil.copytree(tiny_package, second)
    write_manifest(second, read_manifest(second).model_copy(update={"version": "2"}))
    before = (second / "manifest.json").read_text()
    exe = Path(sys.executable).with_name("cdae")
    r = subprocess.run([str(exe), "evaluate", "--models-dir", str(store), "--model", "tiny:1", "--model", "tiny:2",
                        "--frames", "3", "--val-frames", "2", "--sizes", "64x64", "--no-timing", "--update-manifest",
                        "--set", "scene.plasma_psf_sigma_px=[0,0]", "--out", str(tmp_path / "eval")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["held_out"]["overrides"] == ["scene.plasma_psf_sigma_px=[0,0]"]
    assert "scene.plasma_psf_sigma_px=[0,0]" in (tmp_path / "eval" / "report.md").read_text()
    assert read_manifest(tiny_package).metrics["held_out"]["held_out"]["overrides"] == report["held_out"]["overrides"]
    assert (second / "manifest.json").read_text() == before
    bad = subprocess.run([str(exe), "evaluate", "--models-dir", str(store), "--model", "tiny:1", "--no-timing",
                          "--set", "scene.plasma_psf_sigma_px=[-1,0]", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "plasma_psf_sigma_px" in bad.stderr + bad.stdout
    assert not (tmp_path / "bad").exists()


def test_model_runner_never_serves_another_frames_output(tiny_package: Path) -> None:
    """Frames made on the fly (a transformed input) may get the id of a freed one: not its output."""
    from cdae.training.evaluate import ModelRunner

    den = Denoiser.from_package(tiny_package)
    runner = ModelRunner(den)
    rng = np.random.default_rng(0)
    for k in range(6):
        frame = rng.uniform(0, 4095, size=(48, 64)).astype(np.float32) * (k + 1) / 6
        expected = den.denoise_dn(frame, 4095.0)[0]
        assert np.array_equal(runner.outputs(frame * 1.0, 4095)[0], expected)


def test_calibration_frames_record_the_held_out_frames_own_camera() -> None:
    """Darks and flats of frame i's camera show the same dead, hot and bad-line pixels as frame i, and
    `find_bad_pixels` finds them there."""
    from cdae.training.characterise import find_bad_pixels
    from cdae.training.dataset import calibration_frames
    from cdae.training.defects import BAD_LINE, DEAD, HOT

    data = DataConfig()
    frames = simulated_frames(data, data.test_seed, 0, 6, [(64, 64), (48, 80)])
    seen = 0
    for i, fr in enumerate(frames):
        darks, flats, static = calibration_frames(data, data.test_seed, i, *fr.noisy.shape, fr.bit_depth, count=8)
        assert darks.shape == flats.shape == (8, *fr.noisy.shape)
        true = (fr.defect_mask & (DEAD | HOT | BAD_LINE)) != 0
        assert np.array_equal(static != 0, true)
        found, _ = find_bad_pixels(darks, flats)
        seen += int(true.sum())
        assert (found & true).sum() >= 0.9 * true.sum()
        assert (found & ~true).sum() <= 0.01 * found.size
    assert seen > 0


def test_evaluate_with_bad_pixel_maps(tmp_path: Path, tiny_package: Path) -> None:
    den = Denoiser.from_package(tiny_package)
    report = evaluate([("tiny:1", den)], tmp_path / "eval", frames=6, val_frames=4, sizes=[(64, 64), (48, 80)],
                      timing=False, log=lambda s: None, bad_pixel_maps=True)
    assert "tiny:1 + bad-pixel map" in report["methods"] and "tiny:1 + bad-pixel map" in report["comparisons"]
    assert report["bad_pixel_maps"]["listed"] > 0
    mapped = report["methods"]["tiny:1 + bad-pixel map"]["per_defect_class"]
    plain = report["methods"]["tiny:1"]["per_defect_class"]
    assert mapped["hot"]["rmse"] < plain["hot"]["rmse"] or plain["hot"]["pixels"] == 0
    assert "bad-pixel map` rows" in (tmp_path / "eval" / "report.md").read_text()
