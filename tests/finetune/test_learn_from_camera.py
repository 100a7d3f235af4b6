"""Done when: a camera with damage and noise the shipped model never saw is recorded live, characterised
and learnt from without clean targets, and the fine-tuned model removes that damage measurably better
while its simulated held-out PSNR stays within 0.5 dB of the parent's.

The camera: the simulated areaDetector IOC, seed 33, a static scene, a new hot column (x = 37, 1.5 %
of the span: fainter than any the model was trained on) and 150 e- read noise (the training range
ends at 30 e-). Its truth is regenerated here from the same camera config, for the judgement only:
fine-tuning sees nothing but the recorded frames.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cdae.engine.inference import Denoiser
from cdae.engine.package import read_manifest
from cdae.simcamera import CameraConfig, simulate_bank
from cdae.recording import read_runs
from cdae.training.characterise import load_profile
from cdae.training.metrics import psnr, rmse
from ioc_helpers import Stack, ca_write, cdae, value_of, wait_for

SIZE = 96
COLUMN = 37
CAMERA = CameraConfig(seed=33, width=SIZE, height=SIZE, bank=40, static_scene=True, hot_columns=[COLUMN],
                      hot_column_offset_frac=0.015, read_noise_e=150.0)
PARENT = "cdae-default:7"
SHIPPED = Path(__file__).resolve().parents[2] / "models"  # the source tree's store, whatever CDAE_MODELS says
#: the default schedule (320 steps of 16 patches of 32x32 at lr 1e-4: about 20 s on 2 free cores, a few
#: minutes on busy ones)
DEFAULT = ["data.val_frames=8"]
#: twice as long
LONG = ["optim.epochs=8", "data.val_frames=8"]


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cdae(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ})
    assert r.returncode == 0, f"cdae {args[0]} failed:\n{r.stdout}\n{r.stderr}"
    return r


def _record_camera(stack: Stack, out: Path) -> None:
    p = stack.camera_prefix
    stack.camera("--seed", "33", "--static-scene", "--hot-columns", str(COLUMN), "--hot-column-offset-frac", "0.015",
                 "--read-noise-e", "150", "--bank", "40", "--shutter-closed", size=f"{SIZE}x{SIZE}", rate=20)
    _run("record", "--source", p, "--frames", "8", "--dark", "-o", str(out), "--bit-depth", "12", "--no-progress")
    ca_write(p + "ShutterControl", 1)  # Open
    wait_for(lambda: value_of(p + "ShutterStatus_RBV") == 1, what="shutter open")
    _run("record", "--source", p, "--frames", "40", "-o", str(out), "--bit-depth", "12", "--no-progress",
         "--note", "static target, new hot column")


def _truth_scores(pkg: Path, frames: np.ndarray, clean: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    den = Denoiser.from_package(pkg)
    outs = [np.clip(den.denoise_dn(f, 4095.0)[0], 0, 4095) for f in frames]
    return {
        "psnr_db": float(np.mean([psnr(o, clean, 4095) for o in outs])),
        "valid_psnr_db": float(np.mean([10 * np.log10(4095**2 / np.mean((o - clean)[valid] ** 2)) for o in outs])),
        "column_rmse_dn": float(np.mean([rmse(o[:, COLUMN], clean[:, COLUMN]) for o in outs])),
        "column_offset_dn": float(np.mean([np.mean(o[:, COLUMN] - clean[:, COLUMN]) for o in outs])),
    }


def _learn_from_camera(stack: Stack, tmp_path: Path, overrides: list[str]) -> dict[str, object]:
    rec = tmp_path / "camera.h5"
    _record_camera(stack, rec)
    dark, light = read_runs(rec)
    assert dark.info.dark and dark.info.frames == 8 and light.info.frames == 40 and light.info.complete

    _run("characterise", str(rec))
    profile = load_profile(tmp_path / "camera.profile.json")
    assert [(b.axis, b.index, b.kind) for b in profile.bad_lines] == [("column", COLUMN, "hot")]

    store = tmp_path / "models"
    sets = [a for s in overrides for a in ("--set", s)]
    _run("finetune", "--init", PARENT, "--models-dir", str(SHIPPED), "--out", str(store), "--data",
         str(rec), "--run-dir", str(tmp_path / "runs"), "--eval-frames", "96", "--no-progress", *sets)
    (pkg,) = (store / "cdae-default").iterdir()
    manifest = read_manifest(pkg)
    assert manifest.parent == PARENT and manifest.data[0].frames_held_out == 10
    assert manifest.metrics["real_objective"] == "noise2noise"
    report = json.loads((pkg / "real-evaluation" / "report.json").read_text())

    # the judgement, against the truth the fine-tune never saw: the 10 held-out frames
    clean = simulate_bank(CAMERA.model_copy(update={"bank": 1}), SIZE, SIZE)[0].clean
    held = light.frames(slice(30, 40)).astype(np.float32)
    valid = profile.defect_mask() == 0
    base = _truth_scores(SHIPPED / "cdae-default" / "7", held, clean, valid)
    tuned = _truth_scores(pkg, held, clean, valid)
    sim = report["simulated"]["summary"]
    return {"base": base, "tuned": tuned, "sim_base": sim[PARENT]["psnr_db"], "sim_tuned": sim[manifest.ref]["psnr_db"],
            "report": report, "ref": manifest.ref}


def _assert_learnt(r: dict[str, object], column_gain: float, psnr_gain_db: float) -> None:
    base, tuned = r["base"], r["tuned"]
    print(json.dumps({k: v for k, v in r.items() if k != "report"}, indent=1))
    assert tuned["column_rmse_dn"] <= column_gain * base["column_rmse_dn"]  # the new hot column: removed better
    assert abs(tuned["column_offset_dn"]) < abs(base["column_offset_dn"])
    assert tuned["psnr_db"] >= base["psnr_db"] + psnr_gain_db  # the whole frame, new noise level included
    assert r["sim_tuned"] >= r["sim_base"] - 0.5  # nothing forgotten on the simulated held-out set
    # the evaluation without ground truth sees it too
    summary = r["report"]["summary"]
    assert summary[r["ref"]]["line_offset_removed"] > summary[PARENT]["line_offset_removed"]


def test_finetuned_model_removes_the_new_camera_pattern(camera_stack: Stack, tmp_path: Path) -> None:
    # from cdae-default:7 (44.9 dB on this camera before; column RMSE 45 DN, offset 38 DN): measured +0.35 dB
    # twice, column RMSE x0.857 and x0.829, offset 28.9 and 26.8 DN, simulated held-out +0.04 (48 frames)
    # and +0.02 dB (96 frames: the mean of more frames moves less with the few frames a fine-tune swings)
    _assert_learnt(_learn_from_camera(camera_stack, tmp_path, DEFAULT), column_gain=0.9, psnr_gain_db=0.15)


@pytest.mark.slow
def test_long_finetune_on_the_new_camera(camera_stack: Stack, tmp_path: Path) -> None:
    """Twice the default schedule (640 steps): the same judgement, with larger margins."""
    # measured: +0.55 dB, column RMSE x0.808, offset 37.9 -> 23.5 DN, simulated held-out -0.29 dB
    _assert_learnt(_learn_from_camera(camera_stack, tmp_path, LONG), column_gain=0.85, psnr_gain_db=0.3)
