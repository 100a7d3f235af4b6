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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cdae-default:7")
    p.add_argument("--models-dir", help="model store (default: the repository's models/)")
    p.add_argument("--which", choices=["val", "test"], default="val")
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--k", type=float, nargs="+", default=[1.0, 2.0], help="guard bounds to score (k sigma)")
    p.add_argument("--threshold", type=float, nargs="*", default=[], help="defect-head thresholds to score")
    p.add_argument("--head-alone", action="store_true", help="also score each threshold without the learned "
                   "flag's two tests (the head's word alone)")
    p.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                   help="also score the guard with these GuardConfig fields (JSON), e.g. "
                   "--variant peaks-off '{\"defect_threshold\": 0.5, \"learned_peak_sigma\": null}'")
    p.add_argument("--bad-pixel-maps", action="store_true", help="also score the served guard with each camera's "
                   "bad-pixel map, as a site deploys it (found by cdae badpixels from 16 darks and 16 flats)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "guard-val.json"))
    args = p.parse_args(argv)

    from cdae.engine.guard import GuardConfig
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import ModelRegistry
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.evaluate import DEFAULT_SIZES
    from cdae.training.real_scenes import NOISY, RESTORABLE, baseline_method, model_method, noisy_method, score_methods

    data = DataConfig()
    frames = simulated_frames(data, data.val_seed if args.which == "val" else data.test_seed, 0, args.frames,
                              DEFAULT_SIZES)
    pkg = ModelRegistry(Path(args.models_dir) if args.models_dir else ROOT / "models").resolve(args.model)
    # the scoring is training/real_scenes.py's, the same on simulated and on real scenes
    methods = {NOISY: noisy_method(), "median3": baseline_method("median3"),
               args.model: model_method(Denoiser.from_package(pkg))}
    for k in args.k:
        methods[f"{args.model} + guard k={k:g}"] = model_method(Denoiser.from_package(
            pkg, guard=GuardConfig(k_sigma=k, defect_threshold=None)))  # the head flags nothing
        for t in args.threshold:
            methods[f"{args.model} + guard k={k:g} head>{t:g}"] = model_method(
                Denoiser.from_package(pkg, guard=GuardConfig(k_sigma=k, defect_threshold=t)))
            if args.head_alone:  # the learned flag without the optics' agreement (engine.guard.impulse_evidence)
                methods[f"{args.model} + guard k={k:g} head>{t:g} alone"] = model_method(Denoiser.from_package(
                    pkg, guard=GuardConfig(k_sigma=k, defect_threshold=t, learned_evidence_sigma=None, learned_peak_sigma=None)))
    for name, fields in args.variant:
        methods[f"{args.model} + {name}"] = model_method(Denoiser.from_package(pkg, guard=GuardConfig(
            **json.loads(fields))))
    if args.bad_pixel_maps:
        from cdae.engine.badpixels import BadPixelMap
        from cdae.engine.pipeline import denoise_frame
        from cdae.training.evaluate import calibrated_bad_pixel_masks
        from cdae.training.real_scenes import _camera_dtype

        found, _ = calibrated_bad_pixel_masks(data, data.val_seed if args.which == "val" else data.test_seed, frames)
        maps = {id(fr.noisy): BadPixelMap.from_mask(m) for fr, m in zip(frames, found)}
        served = Denoiser.from_package(pkg, guard=GuardConfig())

        def with_map(noisy, adc_max):  # noqa: ANN001, ANN202 - the frame path with the camera's map, as deployed
            r = denoise_frame(noisy, served.backend, adc_max=float(adc_max), want_residual=False,
                              bad_pixels=maps[id(noisy)], guard_config=served.guard)
            return _camera_dtype(r.denoised, adc_max), r.flags

        methods[f"{args.model} + guard + bad-pixel map"] = with_map
    summary, _ = score_methods(frames, methods, RESTORABLE, reference="median3")
    for name, s in summary.items():
        ratios = s.pop("defect_ratio_to_reference")
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
