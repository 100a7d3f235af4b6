"""The noise guard and flags (``cdae.engine.guard``) on simulated frames: what the output contract costs
and buys, against the unguarded network and the tuned 3x3 median.

Scores the issue-16 quantities: PSNR over the *recoverable* pixels (every pixel except saturated
blobs, bloom and real light at the ADC or full well, whose scene is gone for any filter),
restorable-defect RMSE by class against median3, bright-feature RMSE against the noisy input's
frame by frame (how many frames exceed 1.5x), and the share of real pixels each method flags.
Validation frames by default: the held-out set is for the committed evaluation.

    python experiments/guard.py --frames 96 --k 1 2
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cdae-default:7")
    p.add_argument("--which", choices=["val", "test"], default="val")
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--k", type=float, nargs="+", default=[1.0, 2.0], help="guard bounds to score (k sigma)")
    p.add_argument("--threshold", type=float, nargs="*", default=[], help="defect-head thresholds to score")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "guard-val.json"))
    args = p.parse_args(argv)

    from cdae.engine.guard import IMPULSE, LEARNED, GuardConfig
    from cdae.engine.inference import Denoiser
    from cdae.engine.normalise import to_dtype
    from cdae.engine.package import ModelRegistry
    from cdae.engine.pipeline import denoise_frame
    from cdae.training.baselines import make_baseline
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.defects import BLOOM, MASK_BITS, SATURATED_BLOB
    from cdae.training.evaluate import DEFAULT_SIZES
    from cdae.training.metrics import bright_feature_mask

    data = DataConfig()
    frames = simulated_frames(data, data.val_seed if args.which == "val" else data.test_seed, 0, args.frames,
                              DEFAULT_SIZES)
    pkg = ModelRegistry(ROOT / "models").resolve(args.model)
    median3 = make_baseline("median3")

    def camera(x: np.ndarray, adc_max: int) -> np.ndarray:
        return to_dtype(x, np.uint16 if adc_max > 255 else np.uint8, float(adc_max)).astype(np.float32)

    methods: dict[str, object] = {"noisy": None, "median3": None, args.model: Denoiser.from_package(pkg)}
    for k in args.k:
        methods[f"{args.model} + guard k={k:g}"] = Denoiser.from_package(
            pkg, guard=GuardConfig(k_sigma=k, defect_threshold=None))  # the head flags nothing
        for t in args.threshold:
            methods[f"{args.model} + guard k={k:g} head>{t:g}"] = Denoiser.from_package(
                pkg, guard=GuardConfig(k_sigma=k, defect_threshold=t))
    classes = {n: b for n, b in MASK_BITS.items() if b not in (BLOOM, SATURATED_BLOB)}
    acc = {m: {"se_rec": 0.0, "n_rec": 0, "psnr_rec": [], "bright_ratio": [], "flagged_real": 0, "n_real": 0,
               **{f"se_{c}": 0.0 for c in classes}, **{f"n_{c}": 0 for c in classes}} for m in methods}
    for fr in frames:
        lost = (fr.defect_mask & (BLOOM | SATURATED_BLOB)) != 0
        lost |= fr.clean >= fr.adc_max - 0.5  # real light clipped: its scene is gone too
        rec = ~lost
        bright = bright_feature_mask(fr.clean, fr.defect_mask) & rec
        noisy_bright = float(np.sqrt(np.mean((camera(fr.noisy, fr.adc_max)[bright] - fr.clean[bright]) ** 2))) \
            if bright.any() else math.nan
        for name, m in methods.items():
            flags = None
            if name == "noisy":
                est = camera(fr.noisy, fr.adc_max)
            elif name == "median3":
                est = median3(fr.noisy, fr.adc_max)
            else:
                r = denoise_frame(np.asarray(fr.noisy, np.float32), m.backend, adc_max=float(fr.adc_max),
                                  want_residual=False, guard_config=m.guard)
                est, flags = camera(r.denoised, fr.adc_max), r.flags
            a = acc[name]
            err = (est - fr.clean) / fr.adc_max
            se = float(np.sum(err[rec] ** 2))
            a["se_rec"] += se
            a["n_rec"] += int(rec.sum())
            a["psnr_rec"].append(-10 * math.log10(max(se / max(int(rec.sum()), 1), 1e-20)))
            for c, bit in classes.items():
                sel = ((fr.defect_mask & bit) != 0) & rec
                a[f"se_{c}"] += float(np.sum(err[sel] ** 2))
                a[f"n_{c}"] += int(sel.sum())
            if bright.any() and noisy_bright > 0:
                a["bright_ratio"].append(float(np.sqrt(np.mean((est[bright] - fr.clean[bright]) ** 2))) / noisy_bright)
            if flags is not None:  # impulses on real light: saturated pixels are kept raw, never "restored"
                real = (fr.defect_mask == 0) & rec
                a["flagged_real"] += int((((flags == IMPULSE) | (flags == LEARNED)) & real).sum())
                a["n_real"] += int(real.sum())
    summary = {}
    for name, a in acc.items():
        br = np.array(a["bright_ratio"])
        s = {"psnr_recoverable_db": float(np.mean(a["psnr_rec"])),
             "bright_ratio_max": float(br.max()), "bright_ratio_median": float(np.median(br)),
             "frames_bright_over_1.5x": int((br > 1.5).sum()), "frames": len(frames),
             "false_flag_share": (a["flagged_real"] / a["n_real"]) if a["n_real"] else None}
        for c in classes:
            s[f"rmse_{c}"] = math.sqrt(a[f"se_{c}"] / a[f"n_{c}"]) if a[f"n_{c}"] else math.nan
        summary[name] = s
    for name, s in summary.items():
        ratios = {c: s[f"rmse_{c}"] / summary["median3"][f"rmse_{c}"] for c in classes
                  if summary["median3"][f"rmse_{c}"] > 0}
        s["defect_ratio_to_median3"] = ratios
        print(f"{name:34s} PSNR(rec) {s['psnr_recoverable_db']:6.2f} dB  bright max {s['bright_ratio_max']:5.2f}x "
              f"median {s['bright_ratio_median']:4.2f}x  >1.5x in {s['frames_bright_over_1.5x']:3d}  "
              + " ".join(f"{c} {v:.2f}x" for c, v in ratios.items())
              + (f"  false flags {s['false_flag_share']:.2e}" if s["false_flag_share"] is not None else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "which": args.which, "frames": args.frames,
                               "summary": summary}, indent=1, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
