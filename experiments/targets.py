"""Issue 2's three target quantities for candidate models on a chosen frame set, with their bootstrap.

``cdae evaluate`` scores the held-out frames (test seed) and writes the committed report; this
scores the *validation* frames (or any set, ``--set``) for choosing between candidates, so the
held-out set stays unseen until the choice is made. The baseline is fixed (``--baseline``,
default median3: the validation-tuned best baseline of every evaluation so far).

    python experiments/targets.py cdae-default:6 runs/rad/rad-a/1 --which val --frames 192
    python experiments/targets.py cdae-default:6 --which val --frames 96 --stress   # rare scenes
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Scenes that decide the bright target: real light at a small full well with bloom, 16-bit.
STRESS = ["scene.saturating_fraction=1.0", "bit_depths=[16]", "defects.full_well_e=[2000,6000]",
          "defects.bloom_probability=1.0", "scene.kind_weights={edges: 1, spots: 1, mixed: 1}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME[:VERSION] in --models, or a package folder")
    p.add_argument("--which", choices=["val", "test"], default="val", help="validation (seed 2) or held-out (seed 3)")
    p.add_argument("--frames", type=int, default=192)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data distribution override")
    p.add_argument("--stress", action="store_true", help="the rare-scene distribution (STRESS overrides)")
    p.add_argument("--baseline", default="median3")
    p.add_argument("--models", dest="store", default=str(ROOT / "models"))
    args = p.parse_args(argv)

    from cdae.engine.inference import Denoiser
    from cdae.engine.package import ModelRegistry
    from cdae.training.baselines import make_baseline
    from cdae.training.config import DataConfig, with_overrides
    from cdae.training.dataset import simulated_frames
    from cdae.training.evaluate import DEFAULT_SIZES, ModelRunner
    from cdae.training.metrics import bootstrap_targets, frame_metrics, target_quantities

    overrides = (STRESS if args.stress else []) + args.set
    data = with_overrides(DataConfig(), overrides, "data")
    frames = simulated_frames(data, data.val_seed if args.which == "val" else data.test_seed, 0, args.frames,
                              DEFAULT_SIZES)
    baseline = make_baseline(args.baseline)
    noisy = [frame_metrics(fr.noisy, fr.clean, fr.defect_mask, fr.adc_max) for fr in frames]
    base = [frame_metrics(baseline(fr.noisy, fr.adc_max), fr.clean, fr.defect_mask, fr.adc_max) for fr in frames]
    print(f"{args.frames} {'validation' if args.which == 'val' else 'held-out'} frames {overrides or ''}; "
          f"baseline {baseline.name}; bootstrap 5/50/95 %")
    registry = ModelRegistry(Path(args.store))
    for ref in args.models:
        pkg = Path(ref) if Path(ref).is_dir() else registry.resolve(ref)
        runner = ModelRunner(Denoiser.from_package(pkg))
        model = [frame_metrics(runner.full(fr.noisy, fr.adc_max), fr.clean, fr.defect_mask, fr.adc_max)
                 for fr in frames]
        q = target_quantities(model, base, noisy)
        bs = bootstrap_targets(model, base, noisy)
        print(f"{ref:32s} PSNR gain {q['psnr_gain_db']:+.2f} dB ({bs['psnr_gain_db'][0]:+.2f} … "
              f"{bs['psnr_gain_db'][2]:+.2f}), defect {q['defect_ratio']:.2f}x ({bs['defect_ratio'][0]:.2f} … "
              f"{bs['defect_ratio'][2]:.2f}), bright {q['bright_ratio']:.3f}x ({bs['bright_ratio'][0]:.2f} … "
              f"{bs['bright_ratio'][2]:.2f}); all met in {bs['share_meeting_all']:.0%} of resamples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
