"""The defect ratio without the pixels whose truth no single frame holds: for the team's decision on issue 2.

Where real light saturates and blooms, the bloom fills its column at the full well right up to the
real saturated region: nothing in the frame says where the real light ends and the bloom begins
(held-out frame 87: a field-wide region at the full well with bloom across every column above it;
every filter is ~0.78 of full scale off there). This scores the defect-pixel RMSE ratio (3x3 median
/ model) on all defect pixels, as issue 2's target does, and without the bloom pixels joined
(8-connected, through bloom and real saturated light) to real light at the frame's full well. It
does not change any target; it says what option (b) of session 6's note would measure.

    python experiments/information_lost.py cdae-default:7 --which test --frames 192
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def information_lost(clean: np.ndarray, defect_mask: np.ndarray, adc_max: int) -> np.ndarray:
    """Bloom pixels joined to real light saturated at the frame's full well (its clean maximum, when
    that is at least half the ADC range)."""
    from scipy import ndimage

    from cdae.training.defects import BLOOM

    top = float(clean.max())
    if top < 0.5 * adc_max:
        return np.zeros(clean.shape, bool)
    real_sat = (clean >= top - 0.5) & (defect_mask == 0)
    bloom = (defect_mask & BLOOM) != 0
    labels, _ = ndimage.label(bloom | real_sat, structure=np.ones((3, 3)))
    joined = np.unique(labels[real_sat])
    return bloom & np.isin(labels, joined[joined > 0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME[:VERSION] in models/, or a package folder")
    p.add_argument("--which", choices=["val", "test"], default="val")
    p.add_argument("--frames", type=int, default=192)
    args = p.parse_args(argv)

    from cdae.engine.inference import Denoiser
    from cdae.engine.package import ModelRegistry
    from cdae.training.baselines import make_baseline
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.evaluate import DEFAULT_SIZES, ModelRunner

    data = DataConfig()
    frames = simulated_frames(data, data.val_seed if args.which == "val" else data.test_seed, 0, args.frames,
                              DEFAULT_SIZES)
    lost = [information_lost(fr.clean, fr.defect_mask, fr.adc_max) for fr in frames]
    defects = [fr.defect_mask != 0 for fr in frames]
    median = make_baseline("median3")

    def se(est: list[np.ndarray]) -> tuple[float, float]:
        e2 = [((e - fr.clean) / fr.adc_max) ** 2 for e, fr in zip(est, frames)]
        return (float(sum(x[d].sum() for x, d in zip(e2, defects))),
                float(sum(x[d & ~lo].sum() for x, d, lo in zip(e2, defects, lost))))

    base = se([median(fr.noisy, fr.adc_max) for fr in frames])
    n_all, n_lost = sum(int(d.sum()) for d in defects), sum(int(lo.sum()) for lo in lost)
    per_frame = sorted(((int(lo.sum()), i) for i, lo in enumerate(lost) if lo.any()), reverse=True)
    print(f"{args.frames} {'validation' if args.which == 'val' else 'held-out'} frames: {n_all} defect pixels, "
          f"{n_lost} of them bloom joined to real saturated light, in {len(per_frame)} frames "
          f"(most: {', '.join(f'frame {i} {n}' for n, i in per_frame[:3])})")
    registry = ModelRegistry(ROOT / "models")
    for ref in args.models:
        runner = ModelRunner(Denoiser.from_package(Path(ref) if Path(ref).is_dir() else registry.resolve(ref)))
        m = se([runner.full(fr.noisy, fr.adc_max) for fr in frames])
        print(f"{ref:28s} defect ratio vs median3: all defect pixels {np.sqrt(base[0] / m[0]):.2f}x, "
              f"without those {np.sqrt(base[1] / m[1]):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
