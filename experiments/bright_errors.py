"""Where does a model's error on bright real features come from? Per pixel class, scene kind and frame.

``cdae evaluate`` reports one number for the brightest real (non-defect) pixels, the top 1 % of
each clean frame. This splits the model's squared error on them, beside the noisy input's, into:
pixels at saturation or the detected full well (``sat``), pixels the defect head calls defects
(``called``, p > 0.5: a real feature painted over), isolated peaks of the clean scene (``peak``,
brighter than all 8 neighbours and twice their mean) and the rest; then by scene kind; then the
frames holding the most of it. ``oracle-min`` is the ratio if each pixel took the better of model
and raw: how much a per-pixel rule could win at most.

    python experiments/bright_errors.py cdae-default:6 --which val --frames 96
    python experiments/bright_errors.py cdae-default:5 --which test --set scene.plasma_psf_sigma_px=[0,0]
    python experiments/bright_errors.py cdae-default:6 --which test --frames 192 --png worst.png  # + pictures
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
_RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="NAME[:VERSION]")
    p.add_argument("--which", choices=["val", "test"], default="val", help="validation (seed 2) or held-out (seed 3)")
    p.add_argument("--frames", type=int, help="default: 24 validation, 48 held-out frames")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data distribution override")
    p.add_argument("--models", default=str(ROOT / "models"))
    p.add_argument("--worst", type=int, default=8, help="frames listed")
    p.add_argument("--png", help="draw the worst frames (--png-frames of them) to this PNG")
    p.add_argument("--png-frames", type=int, default=2)
    args = p.parse_args(argv)

    from cdae.engine.inference import Denoiser
    from cdae.engine.normalise import NormalisationConfig, detect_full_well, full_well_mask
    from cdae.engine.package import ModelRegistry
    from cdae.training.config import DataConfig, with_overrides
    from cdae.training.dataset import simulated_frames
    from cdae.training.evaluate import DEFAULT_SIZES, ModelRunner
    from cdae.training.metrics import (
        PAINTED_OVER_FACTOR,
        PAINTED_OVER_SHARE,
        bright_feature_mask,
        painted_over_frames,
    )

    data = with_overrides(DataConfig(), args.set, "data")
    n = args.frames or (24 if args.which == "val" else 48)
    frames = simulated_frames(data, data.val_seed if args.which == "val" else data.test_seed, 0, n, DEFAULT_SIZES)
    runner = ModelRunner(Denoiser.from_package(ModelRegistry(Path(args.models)).resolve(args.model)))
    # the model's own full-well detection; models without one are judged by the plain rule
    detection = runner.denoiser.manifest.normalisation
    if detection.full_well == "off":
        detection = NormalisationConfig(full_well="detect")

    sums: dict[str, list[float]] = {}  # key -> [pixels, model SE, noisy SE, min SE]
    pictures: dict[int, tuple] = {}
    per_frame = []
    for i, fr in enumerate(frames):
        cam, prob = runner.full(fr.noisy, fr.adc_max), runner.outputs(fr.noisy, fr.adc_max)[1]
        bright = bright_feature_mask(fr.clean, fr.defect_mask != 0)
        em = ((cam - fr.clean) / fr.adc_max).astype(np.float64) ** 2
        en = ((fr.noisy - fr.clean) / fr.adc_max).astype(np.float64) ** 2
        sat = fr.noisy >= fr.adc_max - 0.5
        fw = detect_full_well(fr.noisy, float(fr.adc_max), detection)
        if fw is not None:
            sat |= full_well_mask(fr.noisy, fw)
        c = fr.clean.astype(np.float64)
        ring_max = ndimage.maximum_filter(c, footprint=_RING, mode="nearest")
        ring_mean = (ndimage.uniform_filter(c, 3, mode="nearest") * 9 - c) / 8
        peak = (c > ring_max) & (c > 2 * ring_mean)
        cls = np.where(sat, 0, np.where(prob > 0.5, 1, np.where(peak, 2, 3)))
        for key, m in [*((name, bright & (cls == k)) for k, name in enumerate(("sat", "called", "peak", "rest"))),
                       (f"kind:{fr.kind}", bright)]:
            acc = sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])
            acc[0] += int(m.sum())
            acc[1] += float(em[m].sum())
            acc[2] += float(en[m].sum())
            acc[3] += float(np.minimum(em, en)[m].sum())
        per_frame.append((float(em[bright].sum()), float(en[bright].sum()), i, fr.kind, fr.bit_depth))
        if args.png:
            pictures[i] = (fr, cam, prob)
    total_m = sum(f[0] for f in per_frame)
    total_n = sum(f[1] for f in per_frame)
    print(f"{args.model} on {n} {'validation' if args.which == 'val' else 'held-out'} frames {args.set or ''}: "
          f"bright RMSE / noisy input's = {np.sqrt(total_m / total_n):.3f}")
    print(f"{'class':18s} {'pixels':>7s} {'model SE':>9s} {'noisy SE':>9s} {'ratio':>6s} {'oracle-min':>10s}")
    for key, (cnt, sm, sn, smin) in sums.items():
        print(f"{key:18s} {int(cnt):7d} {sm / total_m:9.3f} {sn / total_n:9.3f} {np.sqrt(sm / max(sn, 1e-30)):6.2f} "
              f"{np.sqrt(smin / max(sn, 1e-30)):10.2f}")
    print("(SE columns: share of the model's / the noisy input's total squared error on bright pixels)")
    # a real feature painted over: far above the raw frame's error, and a visible part of the whole
    eaten = [per_frame[k][2] for k in painted_over_frames([f[0] for f in per_frame], [f[1] for f in per_frame])]
    print(f"frames whose bright error is over {PAINTED_OVER_FACTOR:g}x the noisy input's and over "
          f"{PAINTED_OVER_SHARE:.0%} of the total: {len(eaten)} of {len(per_frame)} {eaten}")
    for sm, sn, i, kind, bits in sorted(per_frame, reverse=True)[: args.worst]:
        print(f"frame {i:3d} {kind:10s} {bits:2d}-bit: {sm / total_m:.3f} of the model's error, {sn / total_n:.3f} of the noisy's")
    if args.png:
        worst = [(i, sm / total_m) for sm, _, i, _, _ in sorted(per_frame, reverse=True)[: args.png_frames]]
        _draw(Path(args.png), args.model, [(i, share, *pictures[i]) for i, share in worst])
        print(f"wrote {args.png}")
    return 0


def _draw(path: Path, model: str, rows: list[tuple]) -> None:
    """Per frame: noisy, model, clean (one colour scale), defect probability, true defects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 5, figsize=(20, 3.6 * len(rows)), squeeze=False)
    for ax, (i, share, fr, cam, prob) in zip(axes, rows):
        vmax = float(max(fr.clean.max(), 1.0))
        panels = [("noisy", fr.noisy, vmax), (model, cam, vmax), ("clean", fr.clean, vmax),
                  ("defect probability", prob, 1.0), ("true defects", (fr.defect_mask != 0).astype(np.float32), 1.0)]
        for a, (title, im, top) in zip(ax, panels):
            a.imshow(im, cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(title, fontsize=9)
        ax[0].set_ylabel(f"frame {i}, {fr.kind}, {fr.bit_depth}-bit\n{share:.0%} of the bright error", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    raise SystemExit(main())
