"""Held-out evaluation of model packages against tuned median/Gaussian baselines.

The held-out frames come from the test seed (disjoint from training and validation seeds);
each baseline family gets its best parameter on the validation set (the fairest hand tuning),
then everything is scored on the same held-out frames. Writes ``report.md``, ``report.json``
and ``panels.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdae.engine.inference import Denoiser
from cdae.engine.badpixels import BadPixelMap
from cdae.training.characterise import find_bad_pixels
from cdae.engine.normalise import to_dtype
from cdae.training.baselines import make_baseline, tune_baselines
from cdae.engine.package import Manifest, read_manifest, write_manifest
from cdae.training.config import DataConfig, recorded_data_config, with_overrides
from cdae.training.metrics import (
    PAINTED_OVER_FACTOR,
    PAINTED_OVER_SHARE,
    TARGET_BRIGHT_RATIO,
    TARGET_DEFECT_RATIO,
    TARGET_PSNR_GAIN_DB,
    EvalFrame,
    FrameMetrics,
    aggregate,
    bootstrap_targets,
    bright_error_concentration,
    defects_frame_by_frame,
    frame_metrics,
    painted_over_frames,
    per_class_rmse,
    target_quantities,
)
from cdae.training.report import save_panels, write_markdown_table
from cdae.training.dataset import CALIBRATION_FRAMES, calibration_frames, simulated_frames
from cdae.training.defects import MASK_BITS, has_saturation_artefacts, simulate_frame
from cdae.training.simulate import GENERATOR_VERSION

Method = Callable[[np.ndarray, int], np.ndarray]  # (noisy float32 DN, adc_max) -> estimate float32 DN

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((256, 256), (192, 320))


class ModelRunner:
    """Runs a model once per frame and serves its variants (full output, defect-gated blend, mask)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        # id -> (the frame itself, its outputs): holding the frame keeps its id from being reused
        # by another array while the entry lives
        self._cache: dict[int, tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = {}

    def outputs(self, noisy: np.ndarray, adc_max: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(id(noisy))
        if hit is None or hit[0] is not noisy:
            hit = (noisy, self.denoiser.denoise_dn(noisy, float(adc_max)))
            self._cache[id(noisy)] = hit
        return hit[1]

    @staticmethod
    def _as_camera(frame: np.ndarray, adc_max: int) -> np.ndarray:
        """Rounded and clipped like the camera's integer frames: what users get."""
        return to_dtype(frame, np.uint16 if adc_max > 255 else np.uint8, float(adc_max)).astype(np.float32)

    def full(self, noisy: np.ndarray, adc_max: int) -> np.ndarray:
        return self._as_camera(self.outputs(noisy, adc_max)[0], adc_max)

    def gated(self, noisy: np.ndarray, adc_max: int) -> np.ndarray:
        """deepCR-style use of the defect head: restored where a defect is likely, raw elsewhere."""
        out, prob = self.outputs(noisy, adc_max)
        return self._as_camera(prob * out + (1.0 - prob) * noisy, adc_max)

    def detection(self, frames: Sequence[EvalFrame], threshold: float = 0.5) -> dict[str, float]:
        """Pixel precision/recall/F1 of the defect head against the true defect mask."""
        tp = fp = fn = 0
        for fr in frames:
            flagged = self.outputs(fr.noisy, fr.adc_max)[1] > threshold
            truth = fr.defect_mask != 0
            tp += int((flagged & truth).sum())
            fp += int((flagged & ~truth).sum())
            fn += int((~flagged & truth).sum())
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "threshold": threshold}


def identity(noisy: np.ndarray, adc_max: int) -> np.ndarray:
    return noisy


@dataclass
class MethodScores:
    name: str
    summary: dict[str, float]
    per_kind: dict[str, dict[str, float]]
    per_frame: list[FrameMetrics]
    seconds_per_frame: float
    per_defect_class: dict[str, dict[str, float]]
    bright_concentration: dict[str, float]


def score(name: str, method: Method, frames: Sequence[EvalFrame]) -> tuple[MethodScores, list[np.ndarray]]:
    outputs, metrics = [], []
    t0 = time.perf_counter()
    for fr in frames:
        est = method(fr.noisy, fr.adc_max)
        outputs.append(est)
        metrics.append(frame_metrics(est, fr.clean, fr.defect_mask, fr.adc_max))
    dt = (time.perf_counter() - t0) / max(len(frames), 1)
    kinds = sorted({fr.kind for fr in frames})
    per_kind = {k: aggregate([m for m, fr in zip(metrics, frames) if fr.kind == k]) for k in kinds}
    return MethodScores(name, aggregate(metrics), per_kind, metrics, dt, per_class_rmse(outputs, frames, MASK_BITS),
                        bright_error_concentration(metrics)), outputs


def time_1024_uint16(denoiser: Denoiser, repeats: int = 3) -> dict[str, float]:
    """CPU wall time of the full denoise path (normalise → network → uint16) on a 1024x1024 frame."""
    _, det = simulate_frame(99, 0, 1024, 1024, 16)
    frame = det.noisy.astype(np.uint16)
    denoiser(frame)  # warm-up: first call allocates
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        denoiser(frame)
        times.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(times)), "min_s": float(min(times)), "repeats": repeats}


def evaluate(
    models: Sequence[tuple[str, Denoiser]],
    out_dir: Path | str,
    data: DataConfig | None = None,
    frames: int = 192,
    val_frames: int = 48,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    timing: bool = True,
    log: Callable[[str], None] = print,
    overrides: Sequence[str] = (),
    bad_pixel_maps: bool = False,
) -> dict:
    """Score models and tuned baselines on held-out frames; write report.md/json and panels.png.

    ``overrides`` only names, in the report, how ``data`` differs from the standard distribution.
    ``bad_pixel_maps``: also score each model with its camera's bad-pixel map, as a site deploys it:
    found (``find_bad_pixels``) from the dark frames and flat fields of each held-out frame's
    simulated camera, and filled in the model's output.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = data or DataConfig()
    val = simulated_frames(data, data.val_seed, 0, val_frames, sizes)
    test = simulated_frames(data, data.test_seed, 0, frames, sizes)
    log(f"tuning baselines on {len(val)} validation frames (seed {data.val_seed}) ...")
    tuned = tune_baselines(val)
    methods: list[tuple[str, Method]] = [("noisy input", identity)]
    runners = {name: ModelRunner(d) for name, d in models}
    methods += [(name, r.full) for name, r in runners.items()]
    methods += [(f"{name} (defect-gated)", r.gated) for name, r in runners.items()]
    mapped: list[str] = []
    bad_pixels_found: dict[str, int] = {}
    if bad_pixel_maps:
        log(f"finding bad pixels from {CALIBRATION_FRAMES} darks and {CALIBRATION_FRAMES} flats per held-out camera ...")
        found, bad_pixels_found = calibrated_bad_pixel_masks(data, data.test_seed, test)
        # keyed by the id of each frame's noisy array: the frames live as long as the evaluation
        maps = {id(fr.noisy): BadPixelMap.from_mask(m) for fr, m in zip(test, found)}
        for name, r in runners.items():
            mapped.append(f"{name} + bad-pixel map")
            methods.append((mapped[-1], _with_map(r, maps)))
    methods += [(tuned[f], make_baseline(tuned[f])) for f in ("median", "gaussian")]

    results: dict[str, MethodScores] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for name, method in methods:
        log(f"scoring {name} on {len(test)} held-out frames (seed {data.test_seed}) ...")
        results[name], outputs[name] = score(name, method, test)

    baseline_names = [tuned["median"], tuned["gaussian"]]
    best_baseline = max(baseline_names, key=lambda n: results[n].summary["psnr_db"])
    noisy = results["noisy input"].summary
    comparisons = {}
    saturation_artefacts = [has_saturation_artefacts(fr.defect_mask) for fr in test]
    for name in [n for n, _ in models] + mapped:
        b = results[best_baseline].summary
        frames_of = (results[name].per_frame, results[best_baseline].per_frame, results["noisy input"].per_frame)
        q = target_quantities(*frames_of)
        comparisons[name] = {
            "psnr_gain_over_best_baseline_db": q["psnr_gain_db"],
            "defect_rmse_ratio_best_baseline_over_model": q["defect_ratio"],
            "bright_rmse_model_over_noisy": q["bright_ratio"],
            "bright_rmse_best_baseline_over_noisy": b["rmse_bright"] / noisy["rmse_bright"],
        }
        comparisons[name]["meets_targets"] = bool(
            comparisons[name]["psnr_gain_over_best_baseline_db"] >= TARGET_PSNR_GAIN_DB
            and comparisons[name]["defect_rmse_ratio_best_baseline_over_model"] >= TARGET_DEFECT_RATIO
            and comparisons[name]["bright_rmse_model_over_noisy"] <= TARGET_BRIGHT_RATIO
        )
        comparisons[name]["bootstrap"] = bootstrap_targets(*frames_of)
        comparisons[name]["defects_frame_by_frame"] = defects_frame_by_frame(*frames_of[:2], saturation_artefacts)
    timings = {name: time_1024_uint16(d) for name, d in models} if timing else {}
    detection = {name: r.detection(test) for name, r in runners.items()}

    noisy_bright_se = [m.se_bright for m in results["noisy input"].per_frame]
    plain = [i for i, sat in enumerate(saturation_artefacts) if not sat]
    plain_classes = {n: per_class_rmse([outputs[n][i] for i in plain], [test[i] for i in plain], MASK_BITS)
                     for n in results}
    report = {
        "held_out": {"generator": GENERATOR_VERSION, "overrides": list(overrides), "seed": data.test_seed,
                     "frames": len(test), "sizes": [list(s) for s in sizes],
                     "bit_depths": data.bit_depths, "kinds": sorted({f.kind for f in test})},
        "validation_for_baseline_tuning": {"seed": data.val_seed, "frames": len(val)},
        **({"bad_pixel_maps": {"darks": CALIBRATION_FRAMES, "flats": CALIBRATION_FRAMES, **bad_pixels_found}}
           if bad_pixel_maps else {}),
        "tuned_baselines": tuned,
        "best_baseline": best_baseline,
        "methods": {n: {"summary": r.summary, "per_kind": r.per_kind, "seconds_per_frame": r.seconds_per_frame,
                        "per_defect_class": r.per_defect_class, "bright_error_concentration": r.bright_concentration,
                        "per_defect_class_without_saturation_artefacts": plain_classes[n],
                        "painted_over_frames": painted_over_frames([m.se_bright for m in r.per_frame], noisy_bright_se)}
                    for n, r in results.items()},
        "comparisons": comparisons,
        "defect_head": detection,
        "cpu_1024x1024_uint16_seconds": timings,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    _write_markdown(out_dir / "report.md", report, results)
    _write_panels(out_dir / "panels.png", test, outputs, [n for n, _ in models], best_baseline)
    log(f"wrote {out_dir / 'report.md'}")
    return report


def calibrated_bad_pixel_masks(data: DataConfig, seed: int,
                               frames: Sequence[EvalFrame]) -> tuple[list[np.ndarray], dict[str, int]]:
    """Each frame's bad-pixel mask as a site finds it (``find_bad_pixels`` on the darks and flats of
    its simulated camera, ``calibration_frames``; ``frames`` = frames 0.. of stream ``seed``), and
    how well the masks found match the true permanent defects."""
    found_masks = []
    listed = listed_good = missed = 0
    for i, fr in enumerate(frames):
        darks, flats, static = calibration_frames(data, seed, i, *fr.noisy.shape, fr.bit_depth)
        found, _ = find_bad_pixels(darks, flats)
        true = static != 0
        listed += int(found.sum())
        listed_good += int((found & ~true).sum())
        missed += int((true & ~found).sum())
        found_masks.append(found)
    return found_masks, {"listed": listed, "listed_but_good": listed_good, "bad_not_listed": missed}


def _with_map(runner: ModelRunner, maps: dict[int, BadPixelMap]) -> Method:
    def run(noisy: np.ndarray, adc_max: int) -> np.ndarray:
        return ModelRunner._as_camera(maps[id(noisy)].apply(runner.full(noisy, adc_max)), adc_max)

    return run


def _write_markdown(path: Path, report: dict, results: dict[str, MethodScores]) -> None:
    rows = [{"method": n, **{k: r.summary[k] for k in ("psnr_db", "ssim", "rmse_defect", "rmse_bright", "rmse_all")},
             "ms_per_frame": 1000 * r.seconds_per_frame} for n, r in results.items()]
    lines = [
        "# Evaluation on held-out simulated frames",
        "",
        f"Held-out set (scene generator {report['held_out'].get('generator', '?')}"
        + "".join(f", {o}" for o in report["held_out"].get("overrides", [])) + "): "
        f"{report['held_out']['frames']} frames, seed {report['held_out']['seed']}, sizes "
        f"{report['held_out']['sizes']}, bit depths {report['held_out']['bit_depths']}. Baselines tuned on "
        f"{report['validation_for_baseline_tuning']['frames']} validation frames (seed "
        f"{report['validation_for_baseline_tuning']['seed']}): {report['tuned_baselines']}; best: "
        f"**{report['best_baseline']}**.",
        "",
        "RMSEs are fractions of the ADC full scale; `rmse_defect` is on defect pixels, `rmse_bright` on the",
        "brightest real (non-defect) features (top 1 % of the clean frame), PSNR against the ADC range.",
        "",
        *([f"`+ bad-pixel map` rows: the model's output with its camera's bad pixels filled (median of the unlisted "
           f"3x3 neighbours), the map found by `cdae badpixels` from {b['darks']} dark frames and {b['flats']} flat "
           f"fields of each held-out frame's simulated camera: {b['listed']} pixels listed, {b['listed_but_good']} "
           f"of them good, {b['bad_not_listed']} bad pixels not listed.", ""]
          if (b := report.get("bad_pixel_maps")) else []),
        write_markdown_table(rows, ["method", "psnr_db", "ssim", "rmse_defect", "rmse_bright", "rmse_all", "ms_per_frame"]),
        "## Against the targets",
        "",
    ]
    for name, c in report["comparisons"].items():
        lines += [
            f"**{name}**: PSNR gain over {report['best_baseline']}: {c['psnr_gain_over_best_baseline_db']:+.2f} dB "
            f"(target ≥ 4); defect RMSE {c['defect_rmse_ratio_best_baseline_over_model']:.2f}x better than the "
            f"baseline (target ≥ 3); bright-feature RMSE {c['bright_rmse_model_over_noisy']:.3f} of the noisy "
            f"input's (target ≤ 1; the baseline's: {c['bright_rmse_best_baseline_over_noisy']:.3f}). "
            f"Targets met: **{'yes' if c['meets_targets'] else 'no'}**.",
            "",
        ]
        if "bootstrap" in c:
            b = c["bootstrap"]
            lines += [
                f"How far to trust that on {b['frames']} frames ({b['resamples']} paired bootstrap resamples of "
                f"them; 5th / 50th / 95th percentile): PSNR gain {_pcts(b['psnr_gain_db'], '{:+.2f}')} dB, defect "
                f"ratio {_pcts(b['defect_ratio'], '{:.2f}')}x, bright ratio {_pcts(b['bright_ratio'], '{:.3f}')}; "
                f"targets met in {b['share_meeting_psnr_gain_db']:.0%} / {b['share_meeting_defect_ratio']:.0%} / "
                f"{b['share_meeting_bright_ratio']:.0%} of the resamples, all three in "
                f"**{b['share_meeting_all']:.0%}**.",
                "",
            ]
    for name, d in report["defect_head"].items():
        lines += [f"Defect head of {name} (p > {d['threshold']}): precision {d['precision']:.3f}, recall "
                  f"{d['recall']:.3f}, F1 {d['f1']:.3f}. The `(defect-gated)` row blends restored and raw "
                  "frames by this probability (deepCR style): it keeps the raw noise where no defect is seen.", ""]
    for name, t in report["cpu_1024x1024_uint16_seconds"].items():
        lines += [f"CPU time, {name}, 1024x1024 uint16, full path: median {t['median_s']:.3f} s "
                  f"(min {t['min_s']:.3f} s, {t['repeats']} runs).", ""]
    lines += ["## PSNR by scene kind (dB)", ""]
    kinds = report["held_out"]["kinds"]
    krows = [{"method": n, **{k: r.per_kind[k]["psnr_db"] for k in kinds if k in r.per_kind}} for n, r in results.items()]
    lines += [write_markdown_table(krows, ["method", *kinds]), ""]
    classes = list(MASK_BITS)
    lines += ["## Defect RMSE by class (fraction of full scale)", "",
              "Pixels of each class in the held-out set: " + ", ".join(
                  f"{c} {int(next(iter(results.values())).per_defect_class[c]['pixels'])}" for c in classes) + ".", ""]
    crows = [{"method": n, **{c: r.per_defect_class[c]["rmse"] for c in classes}} for n, r in results.items()]
    lines += [write_markdown_table(crows, ["method", *classes]), ""]
    lines += ["## Defect pixels frame by frame", "",
              f"The pooled defect ratio above is decided by the frames where saturation left glints and blooming "
              f"(thousands of pixels far off, which no 3x3 window repairs). Against {report['best_baseline']}, "
              "pooled over those frames and over the others (only dead, hot, line and radiation pixels), and "
              "frame by frame (ratio of the two defect RMSEs, > 1: the model restores better):", ""]
    frows = []
    for name, c in report["comparisons"].items():
        f = c.get("defects_frame_by_frame")
        if f:
            frows.append({"model": name,
                          "with glints/bloom": f"{f['pooled_ratio_with_saturation_artefacts']:.2f}x "
                                               f"({f['frames_with_saturation_artefacts']} frames)",
                          "without": f"{f['pooled_ratio_without']:.2f}x ({f['frames_without']} frames)",
                          "median per frame": f"{f['median_frame_ratio']:.2f}x",
                          "frames better": f"{f['frames_model_better']} of {f['frames_with_defects']}"})
    if frows:
        lines += [write_markdown_table(frows, list(frows[0])), ""]
    plain_rows = [{"method": n, **{c: m["per_defect_class_without_saturation_artefacts"][c]["rmse"] for c in classes}}
                  for n, m in report["methods"].items() if "per_defect_class_without_saturation_artefacts" in m]
    if plain_rows:
        lines += ["Defect RMSE by class in the frames without glints or bloom:", "",
                  write_markdown_table(plain_rows, ["method", *[c for c in classes if c not in ("bloom", "saturated_blob")]]),
                  ""]
    lines += ["Share of each method's bright-feature squared error in its worst frame (near 1: one scene "
              "eaten, not a general blur): " + ", ".join(
                  f"{n} {r.bright_concentration['worst_frame_share']:.2f} (frame "
                  f"{int(r.bright_concentration['worst_frame'])})" for n, r in results.items()) + ".", ""]
    lines += ["Frames where a real bright feature was painted over (bright-feature squared error over "
              f"{PAINTED_OVER_FACTOR:g}x the noisy input's in that frame and over {PAINTED_OVER_SHARE:.0%} of the method's "
              "total; the pooled RMSE says how badly at worst, this says how often): " + ", ".join(
                  f"{n} {len(m['painted_over_frames'])} of {report['held_out']['frames']}"
                  + (f" {m['painted_over_frames'][:8]}" if m["painted_over_frames"] else "")
                  for n, m in report["methods"].items() if n != "noisy input") + ".", ""]
    lines += ["![panels](panels.png)", ""]
    path.write_text("\n".join(lines))


def _pcts(values: Sequence[float], fmt: str) -> str:
    return " / ".join(fmt.format(v) for v in values)


def _write_panels(path: Path, frames: Sequence[EvalFrame], outputs: dict[str, list[np.ndarray]],
                  model_names: Sequence[str], best_baseline: str, n: int = 4) -> None:
    if not model_names:
        return
    # pick frames of different kinds, preferring damaged ones
    order = sorted(range(len(frames)), key=lambda i: -int((frames[i].defect_mask != 0).sum()))
    chosen, seen = [], set()
    for i in order:
        if frames[i].kind not in seen:
            chosen.append(i)
            seen.add(frames[i].kind)
        if len(chosen) == n:
            break
    rows, titles = [], []
    for i in chosen:
        fr = frames[i]
        rows.append({"noisy": fr.noisy, "model": outputs[model_names[0]][i], "clean": fr.clean,
                     best_baseline: outputs[best_baseline][i]})
        titles.append(f"{fr.kind}, {fr.bit_depth}-bit, {fr.noisy.shape[1]}x{fr.noisy.shape[0]}")
    save_panels(path, rows, row_titles=titles, title=f"{model_names[0]}: noisy / model / residual / clean / {best_baseline}")


def held_out_data(manifest: Manifest, model_distribution: bool, overrides: Sequence[str] = ()) -> DataConfig:
    """The frames ``cdae evaluate`` scores on: the standard held-out set (default scene and detector distributions,
    seeds disjoint from training) unless asked for the model's own training distribution (versions trained on
    different distributions are only comparable on the same frames); ``overrides`` (``--set``, e.g.
    ``scene.plasma_psf_sigma_px=[0,0]``: the held-out frames of generator 1.1) change it."""
    own = recorded_data_config(manifest) if model_distribution else None
    return with_overrides(own or DataConfig(), list(overrides), "held-out data")


def record_held_out(pkg: Path, report: dict, name: str) -> None:
    """Record the held-out metrics of model ``name`` in ``report`` (from :func:`evaluate`) in its package's
    manifest, under ``metrics.held_out``."""
    m = read_manifest(pkg)
    held_out = {"summary": report["methods"][name]["summary"], "comparison": report["comparisons"][name],
                "best_baseline": report["best_baseline"],
                "best_baseline_summary": report["methods"][report["best_baseline"]]["summary"],
                "noisy_summary": report["methods"]["noisy input"]["summary"],
                "held_out": report["held_out"],
                "cpu_1024x1024_uint16_seconds": report["cpu_1024x1024_uint16_seconds"].get(name)}
    write_manifest(pkg, m.model_copy(update={"metrics": {**m.metrics, "held_out": held_out}}))
