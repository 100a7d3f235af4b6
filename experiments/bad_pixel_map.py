"""What a camera's bad-pixel map gives the model, on simulated frames (issue 2's defect pixels).

Hot, dead and bad-line pixels belong to the camera: they sit at the same place in every frame,
so sites measure them once and list them (areaDetector's NDPluginBadPixel file, read by
``cdae.engine.badpixels``). One frame alone cannot tell a stuck pixel from a sharp point source,
and the model, which must not eat point sources, leaves some. Scored here, against the 3x3
median, for each frame of the chosen set:

- ``map after``: the model's output with the listed pixels filled (median of the unlisted ones
  in their 3x3 box), as the IOC and ``cdae denoise --bad-pixels`` do;
- ``map before``: the same fill in the raw frame, then the model;
- each with the *true* map (the frame's dead, hot and bad-line pixels: an upper bound) and with
  the map ``cdae badpixels`` finds from 16 dark frames and 16 flat fields of the same simulated
  camera (same layout of damage, fresh noise, radiation hits in the darks too).

Radiation hits, glints and blooming are transient: no map lists them.

    python experiments/bad_pixel_map.py --which val --frames 192
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cdae-default")
    p.add_argument("--which", choices=["val", "test"], default="val")
    p.add_argument("--frames", type=int, default=192)
    args = p.parse_args(argv)

    from cdae.engine.badpixels import BadPixelMap
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import ModelRegistry
    from cdae.training.baselines import make_baseline
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.defects import BAD_LINE, DEAD, HOT, MASK_BITS, has_saturation_artefacts
    from cdae.training.evaluate import DEFAULT_SIZES, ModelRunner, calibrated_bad_pixel_masks
    from cdae.training.metrics import defects_frame_by_frame, frame_metrics, per_class_rmse, target_quantities

    data = DataConfig()
    seed = data.val_seed if args.which == "val" else data.test_seed
    frames = simulated_frames(data, seed, 0, args.frames, DEFAULT_SIZES)
    runner = ModelRunner(Denoiser.from_package(ModelRegistry(ROOT / "models").resolve(args.model)))
    median = make_baseline("median3")
    names = ["median3", args.model, "true map before", "true map after", "found map before", "found map after"]
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    found_masks, stats = calibrated_bad_pixel_masks(data, seed, frames)
    for fr, found in zip(frames, found_masks):
        true = (fr.defect_mask & (DEAD | HOT | BAD_LINE)) != 0
        model_out = runner.full(fr.noisy, fr.adc_max)
        outs["median3"].append(median(fr.noisy, fr.adc_max))
        outs[args.model].append(model_out)
        for label, m in (("true", true), ("found", found)):
            bp = BadPixelMap.from_mask(m)
            outs[f"{label} map before"].append(runner.full(bp.apply(fr.noisy), fr.adc_max))
            outs[f"{label} map after"].append(bp.apply(model_out))
    metrics = {n: [frame_metrics(o, fr.clean, fr.defect_mask, fr.adc_max) for o, fr in zip(v, frames)]
               for n, v in outs.items()}
    noisy = [frame_metrics(fr.noisy, fr.clean, fr.defect_mask, fr.adc_max) for fr in frames]
    sat = [has_saturation_artefacts(fr.defect_mask) for fr in frames]
    plain = [i for i, s in enumerate(sat) if not s]
    classes = {c: MASK_BITS[c] for c in ("dead", "hot", "bad_line", "radiation")}
    fp, fn = stats["listed_but_good"], stats["bad_not_listed"]
    tp = stats["listed"] - fp
    print(f"{args.frames} {'validation' if args.which == 'val' else 'held-out'} frames (seed {seed}), "
          f"{len(plain)} without glints/bloom. Found maps: {tp:.0f} listed pixels bad, {fp:.0f} listed but good, "
          f"{fn:.0f} bad but not listed ({tp / max(tp + fn, 1):.1%} of the bad pixels)")
    print(f"{'method':28s} {'PSNR gain':>9s} {'defect':>7s} {'bright':>7s} {'plain':>6s} {'median/fr':>9s}  "
          + "  ".join(f"{c:>9s}" for c in classes) + "   (plain frames' class RMSE)")
    for n, m in metrics.items():
        q = target_quantities(m, metrics["median3"], noisy)
        f = defects_frame_by_frame(m, metrics["median3"], sat)
        pc = per_class_rmse([outs[n][i] for i in plain], [frames[i] for i in plain], classes)
        print(f"{n:28s} {q['psnr_gain_db']:+9.2f} {q['defect_ratio']:6.2f}x {q['bright_ratio']:6.3f}x "
              f"{f['pooled_ratio_without']:5.2f}x {f['median_frame_ratio']:8.2f}x  "
              + "  ".join(f"{pc[c]['rmse']:9.4f}" for c in classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
