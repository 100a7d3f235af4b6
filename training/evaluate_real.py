"""Evaluation on a real recording, where there is no ground truth.

What can be measured on held-out frames of a camera:

* **error against the unseen scene, from a second frame**: for two frames ``x_i``, ``x_j`` of the
  same static scene with independent noise, ``mean((D(x_i) - x_j)²) - mean((x_i - x_j)²) / 2``
  is an unbiased estimate of ``mean((D(x_i) - scene)²)`` (Noise2Noise's argument). Reported as an
  estimated PSNR, beside the raw frames' own (the noise);
* **agreement**: RMS difference of the denoised ``D(x_i)`` and ``D(x_j)`` (a filter that invents
  structure from the noise disagrees with itself; one that erases everything agrees perfectly,
  so read it beside the error estimate);
* **residual statistics**: is what the filter removed noise-like? Its variance against the camera
  profile's noise model (1: exactly the noise; below: noise left in; above: structure removed),
  its lag-1 spatial autocorrelation (0 for white noise) and its band-pass structure ratio;
* **defects restored**: the profile's dead/hot/stuck pixels that the output brings within the
  noise of their neighbours, and the share of each bad line's offset removed;
* **simulated held-out metrics** of the same models (PSNR against the simulator's truth): what
  fine-tuning must not lose.

Writes ``report.md``, ``report.json`` and ``panels.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cdae.engine.inference import Denoiser
from cdae.recording import read_runs
from cdae.training.characterise import CameraProfile, is_static_pair, structure_ratio
from cdae.training.config import DataConfig
from cdae.training.dataset import simulated_frames
from cdae.training.evaluate import ModelRunner, identity, score
from cdae.training.report import save_panels, write_markdown_table

NOISY = "noisy input"


def held_out_frames(recording: Path | str, profile: CameraProfile, last: int) -> list[np.ndarray]:
    """The last ``last`` frames of each ordinary run of the profile's size (float32 DN), per run."""
    out = []
    for run in read_runs(recording):
        if run.info.dark or (run.info.height, run.info.width) != (profile.height, profile.width) or run.info.frames < 1:
            continue
        n = run.info.frames
        out.append(run.frames(slice(max(0, n - last), n)).astype(np.float32))
    return out


def _lag1(r: np.ndarray, ok: np.ndarray, axis: int) -> float:
    a = np.take(r, np.arange(r.shape[axis] - 1), axis=axis)
    b = np.take(r, np.arange(1, r.shape[axis]), axis=axis)
    m = np.take(ok, np.arange(ok.shape[axis] - 1), axis=axis) & np.take(ok, np.arange(1, ok.shape[axis]), axis=axis)
    if m.sum() < 16:
        return math.nan
    a, b = a[m] - a[m].mean(), b[m] - b[m].mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _psnr(mse: float, adc_max: float) -> float:
    return 10 * math.log10(adc_max**2 / mse) if mse > 0 else math.inf


def _line_offsets(frame: np.ndarray, profile: CameraProfile, defect: np.ndarray) -> list[float]:
    """Median excess of each bad line over the two good pixels on each side of it, DN."""
    out = []
    for b in profile.bad_lines:
        f = frame if b.axis == "column" else frame.T
        d = defect if b.axis == "column" else defect.T
        seg = slice(b.start, b.stop)
        sides = [f[seg, b.index + s] for s in (-2, -1, 1, 2)
                 if 0 <= b.index + s < f.shape[1] and not d[seg, b.index + s].any()]
        if not sides:
            out.append(math.nan)
            continue
        out.append(float(np.median(f[seg, b.index] - np.mean(sides, axis=0))))
    return out


def _pixels_restored(out: np.ndarray, profile: CameraProfile, defect: np.ndarray) -> dict[str, float]:
    """Share of each pixel-defect class that the output brings within 3 sigma of its good neighbours."""
    h, w = out.shape
    shares = {}
    for name, items in (("dead", profile.dead_pixels), ("hot", profile.hot_pixels), ("stuck", profile.stuck_pixels)):
        ok = []
        for r, c, _ in items:
            win = (slice(max(r - 2, 0), min(r + 3, h)), slice(max(c - 2, 0), min(c + 3, w)))
            good = out[win][defect[win] == 0]
            if good.size:
                ref = float(np.median(good))
                ok.append(abs(float(out[r, c]) - ref) <= 3 * math.sqrt(float(profile.noise_variance_dn2(np.array(ref)))))
        if ok:
            shares[name] = float(np.mean(ok))
    return shares


def _score_real(outputs: list[list[np.ndarray]], frames: list[np.ndarray], profile: CameraProfile,
                defect: np.ndarray) -> dict[str, object]:
    adc_max = float(profile.adc_max)
    est, noise, agree = [], [], []
    nvar, lag_x, lag_y, structure = [], [], [], []
    line_raw, line_out, restored = [], [], []
    for run_frames, run_out in zip(frames, outputs):
        for i, (x, d) in enumerate(zip(run_frames, run_out)):
            ok = (defect == 0) & (x < adc_max - 0.5) & (x > 0.5)
            r = x - d
            nvar.append(float(np.mean(r[ok] ** 2 / profile.noise_variance_dn2(d[ok]))))
            lag_x.append(_lag1(r, ok, 1))
            lag_y.append(_lag1(r, ok, 0))
            structure.append(structure_ratio(np.where(ok, d, x), x))
            line_raw.append(_line_offsets(x, profile, defect))
            line_out.append(_line_offsets(d, profile, defect))
            restored.append(_pixels_restored(d, profile, defect))
            if i + 1 < len(run_frames):
                xj, dj = run_frames[i + 1], run_out[i + 1]
                if not is_static_pair(x, xj, profile.settings.static_ratio):
                    continue
                both = ok & (xj < adc_max - 0.5) & (xj > 0.5)
                half_noise = float(np.mean((x[both] - xj[both]) ** 2)) / 2
                noise.append(half_noise)
                est.append((float(np.mean((d[both] - xj[both]) ** 2)) + float(np.mean((dj[both] - x[both]) ** 2))) / 2
                           - half_noise)
                agree.append(float(np.mean((d[both] - dj[both]) ** 2)))
    result: dict[str, object] = {
        "frames": sum(len(f) for f in frames),
        "static_pairs": len(est),
        "estimated_mse_dn2": float(np.mean(est)) if est else math.nan,
        "estimated_psnr_db": _psnr(float(np.mean(est)), adc_max) if est else math.nan,
        "noise_psnr_db": _psnr(float(np.mean(noise)), adc_max) if noise else math.nan,
        "agreement_rmse_dn": math.sqrt(float(np.mean(agree))) if agree else math.nan,
        "residual_normalised_variance": float(np.mean(nvar)),
        "residual_lag1_x": _nanmean(lag_x),
        "residual_lag1_y": _nanmean(lag_y),
        "residual_structure_ratio": float(np.mean(structure)),
    }
    if profile.bad_lines:
        raw = [_nanmean([f[k] for f in line_raw]) for k in range(len(profile.bad_lines))]
        left = [_nanmean([f[k] for f in line_out]) for k in range(len(profile.bad_lines))]
        result["line_offset_raw_dn"] = raw
        result["line_offset_left_dn"] = left
        result["line_offset_removed"] = 1 - _nanmean(np.abs(left)) / _nanmean(np.abs(raw))
    for name in {k for r in restored for k in r}:
        result[f"restored_{name}"] = float(np.mean([r[name] for r in restored if name in r]))
    return result


def evaluate_recording(models: Sequence[tuple[str, Denoiser]], held_out: Sequence[np.ndarray], profile: CameraProfile,
                       out_dir: Path | str, sim_data: DataConfig | None = None, sim_frames: int = 16,
                       sim_size: int = 128, log: Callable[[str], None] = print) -> dict:
    """Score models on held-out real frames (per run, in recording order) and on simulated held-out frames."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = [np.asarray(f, np.float32) for f in held_out if len(f)]
    if not frames:
        raise ValueError("no held-out frames to evaluate on")
    defect = profile.defect_mask()
    adc_max = float(profile.adc_max)
    methods: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [(NOISY, lambda x: x)]
    for name, den in models:
        methods.append((name, lambda x, den=den: np.clip(den.denoise_dn(x, adc_max)[0], 0, adc_max)))
    real: dict[str, dict[str, object]] = {}
    outputs: dict[str, list[list[np.ndarray]]] = {}
    for name, method in methods:
        log(f"scoring {name} on {sum(len(f) for f in frames)} held-out recorded frames ...")
        outputs[name] = [[method(x) for x in run] for run in frames]
        real[name] = _score_real(outputs[name], frames, profile, defect)

    simulated: dict[str, dict[str, float]] = {}
    if sim_data is not None and sim_frames > 0:
        sim = simulated_frames(sim_data, sim_data.test_seed, 0, sim_frames, [(sim_size, sim_size)])
        log(f"scoring on {len(sim)} simulated held-out frames (seed {sim_data.test_seed}) ...")
        simulated[NOISY] = score(NOISY, identity, sim)[0].summary
        for name, den in models:
            simulated[name] = score(name, ModelRunner(den).full, sim)[0].summary

    keys = ("estimated_psnr_db", "agreement_rmse_dn", "residual_normalised_variance", "residual_lag1_x",
            "residual_lag1_y", "line_offset_removed", "restored_dead", "restored_hot", "restored_stuck")
    summary = {name: {k: r[k] for k in keys if k in r} for name, r in real.items()}
    if simulated:
        for name in summary:
            summary[name]["sim_psnr_db"] = simulated[name]["psnr_db"]
    report = {
        "recording": profile.recording,
        "recording_sha256": profile.recording_sha256,
        "held_out_frames": sum(len(f) for f in frames),
        "real": real,
        "summary": summary,
        "simulated": {"seed": sim_data.test_seed if sim_data else None, "frames": sim_frames if simulated else 0,
                      "summary": simulated},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    _write_markdown(out_dir / "report.md", report)
    rows, titles = [], []
    for k, run in enumerate(frames[:2]):
        row: dict[str, np.ndarray] = {"noisy": run[0]}
        for name, _ in models[:-1]:
            row[name] = outputs[name][k][0]
        if models:
            row["model"] = outputs[models[-1][0]][k][0]
        row["defect map (profile)"] = (defect != 0).astype(np.float32)
        rows.append(row)
        titles.append(f"held-out frame, run {k}")
    save_panels(out_dir / "panels.png", rows, row_titles=titles,
                title=f"{profile.recording}: model = {models[-1][0] if models else '-'}")
    log(f"wrote {out_dir / 'report.md'}")
    return report


def _write_markdown(path: Path, report: dict) -> None:
    rows = [{"method": name, **s} for name, s in report["summary"].items()]
    cols = ["method", *[k for k in ("estimated_psnr_db", "sim_psnr_db", "agreement_rmse_dn",
                                    "residual_normalised_variance", "residual_lag1_x", "residual_lag1_y",
                                    "line_offset_removed", "restored_dead", "restored_hot", "restored_stuck")
                        if any(k in r for r in rows)]]
    lines = [
        f"# Evaluation on {report['recording']} (no ground truth)",
        "",
        f"{report['held_out_frames']} held-out recorded frames (sha256 {report['recording_sha256'][:16]}…); "
        f"simulated held-out set: {report['simulated']['frames']} frames, seed {report['simulated']['seed']}.",
        "",
        "- `estimated_psnr_db`: PSNR against the unseen scene, estimated from the next frame of the same static "
        "scene (mean((D(x_i) − x_j)²) − mean((x_i − x_j)²)/2); the noisy row is the noise itself.",
        "- `agreement_rmse_dn`: RMS difference of consecutive denoised frames, DN.",
        "- `residual_normalised_variance`: variance of raw − denoised over the profile's noise model (1 = the noise).",
        "- `residual_lag1_*`: lag-1 autocorrelation of the residual (0 = white, > 0 = structure removed).",
        "- `line_offset_removed`: share of the bad lines' offset over their neighbours removed.",
        "- `restored_*`: share of the profile's defect pixels brought within 3 sigma of their good neighbours.",
        "- `sim_psnr_db`: PSNR on simulated held-out frames against the simulator's truth (no forgetting).",
        "",
        write_markdown_table(rows, cols),
        "",
        "![panels](panels.png)",
        "",
    ]
    path.write_text("\n".join(lines))
