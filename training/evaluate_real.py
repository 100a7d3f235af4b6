"""Evaluation on a real recording, where there is no ground truth.

What can be measured on held-out frames of a camera:

* **error against the unseen scene, from a second frame**: for two frames ``x_i``, ``x_j`` of the
  same static scene with independent noise, ``mean((D(x_i) - x_j)²) - mean((x_i - x_j)²) / 2``
  is an unbiased estimate of ``mean((D(x_i) - scene)²)`` (Noise2Noise's argument). Reported as an
  estimated PSNR, beside the raw frames' own (the noise), and on the scene's bright features
  alone as an RMS error. Events new in one frame of a pair (glints, radiation hits) are not the
  scene: they are masked out (:func:`static_pair_mask`), and a pair is static when what is left
  of its difference is as structureless as noise. Without static pairs (a moving scene) there is
  no estimate, and the report says why;
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cdae.engine.inference import Denoiser
from cdae.recording import read_runs
from cdae.training.characterise import CameraProfile, robust_sigma, structure_ratio
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


#: A pixel whose frame-to-frame difference is this many sigma off is an event of one frame (glint, hit).
TRANSIENT_SIGMA = 5.0
#: ... and so are its neighbours this many pixels around (a glint's faint halo, a track's edge).
TRANSIENT_GROW = 3
#: A pair is judged (and scored) only on what is left: at least this share of the usable pixels.
MIN_KEPT_SHARE = 0.25
#: Side of the square tiles that are the units of the paired bootstrap (errors of neighbouring
#: pixels are correlated; tiles this far apart much less so).
TILE = 16
#: Bright features: pixels above this fraction of the way from the bias to the scene's brightest.
BRIGHT_FRACTION = 0.5
MIN_BRIGHT_PIXELS = 32


@dataclass
class StaticPair:
    """Frames ``i`` and ``i + 1`` of held-out run ``run`` show one static scene; judge them on ``keep``."""

    run: int
    i: int
    keep: np.ndarray  # (H, W) bool: usable, and no event of either frame
    bright: np.ndarray  # (H, W) bool: part of ``keep`` on the scene's bright features
    structure: float  # structure ratio of the kept difference (1 = noise)


def _pair_sigma(d: np.ndarray, level: np.ndarray, ok: np.ndarray, bins: int = 8) -> np.ndarray:
    """The noise sigma of the difference ``d`` per pixel, measured on the pair itself.

    Robust (MAD) sigma of ``d`` in bins of ``level``: the camera's photon-transfer curve,
    unmoved by a few events; needs no gain in the profile.
    """
    sig = np.full(d.shape, robust_sigma(d[ok]) if ok.any() else 1.0)
    if ok.sum() >= 2 * bins * 32:
        edges = np.unique(np.quantile(level[ok], np.linspace(0, 1, bins + 1)))
        idx = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, max(len(edges) - 2, 0))
        for k in range(len(edges) - 1):
            sel = ok & (idx == k)
            if sel.sum() >= 32:
                sig[idx == k] = robust_sigma(d[sel])
    return np.maximum(sig, 0.5)


def static_pair_mask(a: np.ndarray, b: np.ndarray, ok: np.ndarray, ratio: float) -> tuple[np.ndarray | None, float]:
    """Where two frames show the same scene: ``(keep, structure)``, ``keep`` None if they do not.

    Pixels that differ by more than :data:`TRANSIENT_SIGMA` of the pair's own noise, and their
    neighbours, are events of one frame (glints and radiation hits are new in every frame of a
    real camera) and are left out; the rest of the difference, in units of its noise, must be as
    structureless as white noise within ``ratio`` (:func:`~cdae.training.characterise.structure_ratio`)
    and cover at least :data:`MIN_KEPT_SHARE` of the usable pixels. A scene that moved leaves
    coherent structure everywhere, or events over most of the frame. The noise is binned by the
    darker of the two frames (an event brightens one frame only), twice: without the first
    pass's events the second.
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = b - a
    d -= float(np.median(d[ok])) if ok.any() else 0.0
    level = np.minimum(a, b)
    keep = ok
    for _ in range(2):
        z = d / _pair_sigma(d, level, keep)
        hit = ok & (np.abs(z) > TRANSIENT_SIGMA)
        keep = ok & ~(ndimage.binary_dilation(hit, iterations=TRANSIENT_GROW) if hit.any() else hit)
        if keep.sum() < max(MIN_KEPT_SHARE * ok.sum(), 64):
            return None, math.inf
    s = structure_ratio(np.zeros(z.shape), np.where(keep, z, 0.0))
    return (keep if s <= ratio else None), s


def static_pairs(frames: Sequence[np.ndarray], profile: CameraProfile, defect: np.ndarray) -> list[StaticPair]:
    """Consecutive held-out frames (per run) of one static scene, with where to judge them.

    Bright features are found on the run's other held-out frames where it has any (choosing
    pixels by the pair's own values would pick their noise), else on the pair.
    """
    adc_max = float(profile.adc_max)
    out = []
    for k, run in enumerate(frames):
        # a long run's median hardly depends on two of its frames: found once
        run_ref = ndimage.median_filter(np.median(run, axis=0), size=3) if len(run) >= 8 else None
        for i in range(len(run) - 1):
            x, xj = run[i], run[i + 1]
            ok = (defect == 0) & (x < adc_max - 0.5) & (x > 0.5) & (xj < adc_max - 0.5) & (xj > 0.5)
            keep, s = static_pair_mask(x, xj, ok, profile.settings.static_ratio)
            if keep is None:
                continue
            ref = run_ref
            if ref is None:
                others = [run[j] for j in range(len(run)) if j not in (i, i + 1)]
                ref = ndimage.median_filter(np.median(others, axis=0) if others else (x + xj) / 2, size=3)
            top = float(np.percentile(ref[ok], 99.5))
            bright = keep & (ref >= profile.bias_dn + BRIGHT_FRACTION * (top - profile.bias_dn))
            out.append(StaticPair(k, i, keep, bright, s))
    return out


def no_estimate_reason(frames: Sequence[np.ndarray], pairs: Sequence[StaticPair]) -> str | None:
    """Why there is no error estimate from second frames (None: there is one)."""
    if pairs:
        return None
    consecutive = sum(max(len(r) - 1, 0) for r in frames)
    if not consecutive:
        return "no two consecutive held-out frames in one run (hold out at least 2 per run)"
    return (f"none of the {consecutive} consecutive held-out frame pairs shows a static scene (the scene moved, "
            "or events cover most of the frame): the error against the scene cannot be estimated without "
            "ground truth; only the residual statistics and defect checks apply")


def pair_error_map(d_i: np.ndarray, d_j: np.ndarray, x_i: np.ndarray, x_j: np.ndarray) -> np.ndarray:
    """Per pixel, the unbiased estimate of the squared error against the scene (both directions of the pair)."""
    return (((d_i - x_j) ** 2 + (d_j - x_i) ** 2) / 2 - (x_i - x_j) ** 2 / 2).astype(np.float64)


def _tile_sums(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    ty, tx = -(-h // TILE), -(-w // TILE)
    pad = ((0, ty * TILE - h), (0, tx * TILE - w))
    v = np.pad(np.where(mask, values, 0.0), pad).reshape(ty, TILE, tx, TILE).sum(axis=(1, 3)).ravel()
    n = np.pad(mask.astype(np.float64), pad).reshape(ty, TILE, tx, TILE).sum(axis=(1, 3)).ravel()
    return v, n


def compare_models(outputs: dict[str, list[list[np.ndarray]]], frames: Sequence[np.ndarray],
                   pairs: Sequence[StaticPair], parent: str, child: str, resamples: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> dict[str, dict[str, float]]:
    """Child against parent on the static pairs: estimated MSE (all kept pixels, and bright ones), DN².

    Paired bootstrap over :data:`TILE` x :data:`TILE` tiles (each tile's errors summed over all
    pairs, both models on the same pixels): ``delta = mse(child) - mse(parent)`` (the noise term
    of the estimate cancels in it) with its one-sided ``confidence`` bounds,
    ``delta_low`` and ``delta_high``.
    """
    out: dict[str, dict[str, float]] = {}
    for metric in ("all", "bright"):
        sums = {m: [] for m in (parent, child)}
        counts = []
        for p in pairs:
            mask = p.keep if metric == "all" else p.bright
            x, xj = frames[p.run][p.i], frames[p.run][p.i + 1]
            for m in (parent, child):
                o = outputs[m][p.run]
                sums[m].append(_tile_sums(pair_error_map(o[p.i], o[p.i + 1], x, xj), mask)[0])
            counts.append(_tile_sums(np.zeros(mask.shape), mask)[1])
        if not counts:
            continue
        n = np.sum(counts, axis=0)
        sp, sc = np.sum(sums[parent], axis=0), np.sum(sums[child], axis=0)
        if n.sum() < (MIN_BRIGHT_PIXELS if metric == "bright" else 64):
            continue
        units = n > 0
        n, sp, sc = n[units], sp[units], sc[units]
        rng = np.random.default_rng(seed)
        deltas = []
        for start in range(0, resamples, 256):  # in chunks: a large frame has many tiles
            idx = rng.integers(0, n.size, (min(256, resamples - start), n.size))
            deltas.append((sc[idx].sum(axis=1) - sp[idx].sum(axis=1)) / np.maximum(n[idx].sum(axis=1), 1))
        lo, hi = np.quantile(np.concatenate(deltas), [1 - confidence, confidence])
        out[metric] = {"parent_mse_dn2": float(sp.sum() / n.sum()), "child_mse_dn2": float(sc.sum() / n.sum()),
                       "delta_mse_dn2": float((sc.sum() - sp.sum()) / n.sum()), "delta_low_dn2": float(lo),
                       "delta_high_dn2": float(hi), "pixels": float(n.sum()), "tiles": float(n.size)}
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
    if not math.isfinite(mse):
        return math.nan
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
                defect: np.ndarray, pairs: Sequence[StaticPair] | None = None) -> dict[str, object]:
    adc_max = float(profile.adc_max)
    if pairs is None:
        pairs = static_pairs(frames, profile, defect)
    est, noise, agree, bright = [], [], [], []
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
    for p in pairs:
        x, xj = frames[p.run][p.i], frames[p.run][p.i + 1]
        d, dj = outputs[p.run][p.i], outputs[p.run][p.i + 1]
        err = pair_error_map(d, dj, x, xj)
        noise.append(float(np.mean((x[p.keep] - xj[p.keep]) ** 2)) / 2)
        est.append(float(np.mean(err[p.keep])))
        agree.append(float(np.mean((d[p.keep] - dj[p.keep]) ** 2)))
        if p.bright.sum() >= MIN_BRIGHT_PIXELS:
            bright.append((float(err[p.bright].sum()), int(p.bright.sum())))
    reason = no_estimate_reason(frames, pairs)
    result: dict[str, object] = {
        "frames": sum(len(f) for f in frames),
        "static_pairs": len(est),
        "estimated_mse_dn2": float(np.mean(est)) if est else math.nan,
        "estimated_psnr_db": _psnr(float(np.mean(est)), adc_max) if est else math.nan,
        "noise_psnr_db": _psnr(float(np.mean(noise)), adc_max) if noise else math.nan,
        "agreement_rmse_dn": math.sqrt(float(np.mean(agree))) if agree else math.nan,
        "estimated_bright_rmse_dn": (math.sqrt(max(sum(b[0] for b in bright) / sum(b[1] for b in bright), 0.0))
                                     if bright else math.nan),
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
    if reason:
        result["no_estimate"] = reason
    return result


def evaluate_recording(models: Sequence[tuple[str, Denoiser]], held_out: Sequence[np.ndarray], profile: CameraProfile,
                       out_dir: Path | str, sim_data: DataConfig | None = None, sim_frames: int = 16,
                       sim_size: int = 128, log: Callable[[str], None] = print,
                       compare: tuple[str, str] | None = None, confidence: float = 0.95,
                       resamples: int = 2000) -> dict:
    """Score models on held-out real frames (per run, in recording order) and on simulated held-out frames.

    ``compare``: (parent, child) names among ``models``, compared on the static pairs
    (:func:`compare_models`) into ``report["comparison"]``.
    """
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
    pairs = static_pairs(frames, profile, defect)
    reason = no_estimate_reason(frames, pairs)
    if reason:
        log(f"NO ERROR ESTIMATE: {reason}")
    real: dict[str, dict[str, object]] = {}
    outputs: dict[str, list[list[np.ndarray]]] = {}
    for name, method in methods:
        log(f"scoring {name} on {sum(len(f) for f in frames)} held-out recorded frames ({len(pairs)} static pairs) ...")
        outputs[name] = [[method(x) for x in run] for run in frames]
        real[name] = _score_real(outputs[name], frames, profile, defect, pairs)
    comparison = (compare_models(outputs, frames, pairs, *compare, resamples=resamples, confidence=confidence)
                  if compare and pairs else {})

    simulated: dict[str, dict[str, float]] = {}
    if sim_data is not None and sim_frames > 0:
        sim = simulated_frames(sim_data, sim_data.test_seed, 0, sim_frames, [(sim_size, sim_size)])
        log(f"scoring on {len(sim)} simulated held-out frames (seed {sim_data.test_seed}) ...")
        simulated[NOISY] = score(NOISY, identity, sim)[0].summary
        for name, den in models:
            simulated[name] = score(name, ModelRunner(den).full, sim)[0].summary

    keys = ("estimated_psnr_db", "estimated_bright_rmse_dn", "agreement_rmse_dn", "residual_normalised_variance",
            "residual_lag1_x", "residual_lag1_y", "line_offset_removed", "restored_dead", "restored_hot", "restored_stuck")
    summary = {name: {k: r[k] for k in keys if k in r} for name, r in real.items()}
    if simulated:
        for name in summary:
            summary[name]["sim_psnr_db"] = simulated[name]["psnr_db"]
    report = {
        "recording": profile.recording,
        "recording_sha256": profile.recording_sha256,
        "held_out_frames": sum(len(f) for f in frames),
        "static_pairs": len(pairs),
        "no_estimate_reason": reason,
        "real": real,
        "summary": summary,
        "simulated": {"seed": sim_data.test_seed if sim_data else None, "frames": sim_frames if simulated else 0,
                      "summary": simulated},
    }
    if compare:
        report["comparison"] = {"parent": compare[0], "child": compare[1], "metrics": comparison}
    write_report(out_dir, report)
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


def write_report(out_dir: Path | str, report: dict) -> None:
    """``report.json`` and ``report.md`` of a report (again, after a verdict is added to it)."""
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    _write_markdown(out_dir / "report.md", report)


def _write_markdown(path: Path, report: dict) -> None:
    rows = [{"method": name, **s} for name, s in report["summary"].items()]
    cols = ["method", *[k for k in ("estimated_psnr_db", "estimated_bright_rmse_dn", "sim_psnr_db", "agreement_rmse_dn",
                                    "residual_normalised_variance", "residual_lag1_x", "residual_lag1_y",
                                    "line_offset_removed", "restored_dead", "restored_hot", "restored_stuck")
                        if any(k in r for r in rows)]]
    gate = report.get("gate")
    loud = []
    if gate and gate["verdict"] != "accepted":
        loud = [f"**FINE-TUNE {gate['verdict'].upper()}: {gate['reason']}**", ""]
    if report.get("no_estimate_reason"):
        loud += [f"**No error estimate: {report['no_estimate_reason']}.**", ""]
    lines = [
        f"# Evaluation on {report['recording']} (no ground truth)",
        "",
        *loud,
        f"{report['held_out_frames']} held-out recorded frames (sha256 {report['recording_sha256'][:16]}…); "
        f"simulated held-out set: {report['simulated']['frames']} frames, seed {report['simulated']['seed']}.",
        "",
        "- `estimated_psnr_db`: PSNR against the unseen scene, estimated from the next frame of the same static "
        f"scene (mean((D(x_i) − x_j)²) − mean((x_i − x_j)²)/2) over {report.get('static_pairs', 0)} static pairs, "
        "events of one frame (glints, hits) masked; the noisy row is the noise itself.",
        "- `estimated_bright_rmse_dn`: the same estimate on the scene's bright features, as an RMS error, DN.",
        "- `agreement_rmse_dn`: RMS difference of consecutive denoised frames, DN.",
        "- `residual_normalised_variance`: variance of raw − denoised over the profile's noise model (1 = the noise).",
        "- `residual_lag1_*`: lag-1 autocorrelation of the residual (0 = white, > 0 = structure removed).",
        "- `line_offset_removed`: share of the bad lines' offset over their neighbours removed.",
        "- `restored_*`: share of the profile's defect pixels brought within 3 sigma of their good neighbours.",
        "- `sim_psnr_db`: PSNR on simulated held-out frames against the simulator's truth (no forgetting).",
        "",
        write_markdown_table(rows, cols),
        "",
        *_gate_lines(report),
        "![panels](panels.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def _gate_lines(report: dict) -> list[str]:
    comp, gate = report.get("comparison"), report.get("gate")
    if not comp and not gate:
        return []
    lines = ["## Child against parent on the held-out frames", ""]
    if comp:
        for metric, c in comp["metrics"].items():
            lines.append(f"- estimated MSE ({metric} kept pixels): {comp['parent']} {c['parent_mse_dn2']:.4g}, "
                         f"{comp['child']} {c['child_mse_dn2']:.4g} DN²; child − parent {c['delta_mse_dn2']:+.4g} "
                         f"(bootstrap bounds {c['delta_low_dn2']:+.4g} … {c['delta_high_dn2']:+.4g}, "
                         f"{int(c['tiles'])} tiles)")
    if gate:
        verdict = f"- verdict: **{gate['verdict']}**" + (f": {gate['reason']}" if gate["reason"] else "")
        lines += [f"- rule: {gate['rule']}", verdict]
        lines += [f"  - {c}" for c in gate.get("failures", [])]
    return [*lines, ""]
