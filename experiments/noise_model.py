"""How well the guard's per-frame noise model (``cdae.engine.guard.measure_noise``) reads each simulated
camera's noise: the measured sigma over the true one at every real pixel's level, frame by frame.

The truth is the camera's own: read noise, shot noise, rounding, and the fixed patterns (DSNU, PRNU), which
a single frame cannot tell from noise and which the clean target does not hold (so the raw frame's distance
from the truth is all of them). Beside the served estimator (Immerkaer's 3x3 kernel on blocks), the 1-D
second difference along rows that it replaced, through the same level bins and line fit; the record of the
estimator and fit before both changes is in experiments/results/noise-model-val.json.

    python experiments/noise_model.py --frames 96
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def true_sigma(params: object, clean: np.ndarray) -> np.ndarray:
    """The camera's noise at each clean level, DN: read, shot, rounding and the fixed patterns."""
    p = params
    signal = np.maximum(clean - p.bias_dn, 0)  # type: ignore[attr-defined]
    return np.sqrt((p.read_noise_e / p.gain_e_per_dn) ** 2 + 1 / 12 + signal / p.gain_e_per_dn  # type: ignore[attr-defined]
                   + p.dsnu_dn**2 + (p.prnu_frac * signal) ** 2)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--which", choices=["val", "test"], default="val")
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "noise-model-val.json"))
    args = p.parse_args(argv)

    from cdae.engine.guard import measure_noise, measure_noise_rows
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.defects import frame_camera
    from cdae.training.evaluate import DEFAULT_SIZES

    data = DataConfig()
    seed = data.val_seed if args.which == "val" else data.test_seed
    frames = simulated_frames(data, seed, 0, args.frames, DEFAULT_SIZES)
    estimators = {"blocks (served)": measure_noise, "row triples": measure_noise_rows}
    ratios: dict[str, list[float]] = {name: [] for name in estimators}
    for i, fr in enumerate(frames):
        h, w = fr.noisy.shape
        _, params, _ = frame_camera(seed, i, h, w, fr.bit_depth, data.defects)
        noisy, clean = fr.noisy.astype(np.float32), fr.clean.astype(np.float32)
        saturated = noisy >= fr.adc_max - 0.5
        real = (fr.defect_mask == 0) & ~saturated
        truth = true_sigma(params, clean[real])
        for name, estimate in estimators.items():
            ratios[name].append(float(np.median(estimate(noisy, exclude=saturated).sigma(clean[real]) / truth)))
    summary = {}
    for name, r in ratios.items():
        a = np.array(r)
        summary[name] = {"median_ratio": float(np.median(a)), "mean_abs_log_ratio": float(np.mean(np.abs(np.log(a)))),
                         "frames_over_1.5x": int((a > 1.5).sum()), "frames_over_2x": int((a > 2).sum()),
                         "frames_under_0.8x": int((a < 0.8).sum()), "frames_under_0.67x": int((a < 0.67).sum()),
                         "max": float(a.max()), "min": float(a.min())}
        s = summary[name]
        print(f"{name:16s} median {s['median_ratio']:.3f}  mean |log| {s['mean_abs_log_ratio']:.3f}  "
              f">1.5x {s['frames_over_1.5x']}  >2x {s['frames_over_2x']}  <0.8x {s['frames_under_0.8x']}  "
              f"<0.67x {s['frames_under_0.67x']}  range {s['min']:.2f}-{s['max']:.2f}")
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    record.update({"which": args.which, "frames": args.frames, "summary": summary,
                   "per_frame": {name: r for name, r in ratios.items()}})
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
