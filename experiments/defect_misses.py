"""Where the served filter's restorable-defect error comes from: per defect class, the squared error of
the pixels the guard flagged (by flag class) and of those it left within the bound (missed), the missed
ones by how far the raw pixel stood from the truth in units of the frame's noise; beside the tuned 3x3
median's error on the same pixels. Validation frames by default (the held-out set is for the evaluation).

    python experiments/defect_misses.py --frames 48
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
#: Bins of |raw - truth| / sigma for the missed pixels.
EDGES = (0, 3, 10, 30, 100, 300, np.inf)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cdae-default:7")
    p.add_argument("--which", choices=["val", "test"], default="val")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--guard", default="{}", help="GuardConfig fields (JSON) over the served default")
    p.add_argument("--out", help="write the table as JSON here")
    args = p.parse_args(argv)

    from cdae.engine.guard import FLAG_NAMES, GuardConfig, measure_noise
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import ModelRegistry
    from cdae.engine.pipeline import denoise_frame
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.evaluate import DEFAULT_SIZES
    from cdae.training.real_scenes import RESTORABLE, baseline_method, recoverable

    data = DataConfig()
    frames = simulated_frames(data, data.val_seed if args.which == "val" else data.test_seed, 0, args.frames,
                              DEFAULT_SIZES)
    pkg = ModelRegistry(ROOT / "models").resolve(args.model)
    denoiser = Denoiser.from_package(pkg, guard=GuardConfig(**json.loads(args.guard)))
    threshold = denoiser.guard.defect_threshold if denoiser.guard is not None else None
    median = baseline_method("median3")
    table = {c: {"median3": 0.0, "flagged": {}, "missed": [0.0] * (len(EDGES) - 1), "missed_head": 0.0,
                 "missed_n": [0] * (len(EDGES) - 1), "n": 0, "n_flagged": 0} for c in RESTORABLE}
    for fr in frames:
        noisy = np.asarray(fr.noisy, np.float32)
        clean = np.asarray(fr.clean, np.float32)
        adc = float(fr.adc_max)
        r = denoise_frame(noisy, denoiser.backend, adc_max=adc, want_residual=False, guard_config=denoiser.guard)
        out, flags = r.denoised, r.flags
        head = r.defect_probability if r.defect_probability is not None else np.zeros_like(noisy)
        med, _ = median(noisy, int(adc))
        rec = recoverable(fr)
        sigma = measure_noise(noisy, exclude=noisy >= adc - 0.5).sigma(clean)
        err = (np.asarray(out, np.float32) - clean) / adc
        merr = (np.asarray(med, np.float32) - clean) / adc
        dev = np.abs(noisy - clean) / np.maximum(sigma, 1e-6)
        for c, bit in RESTORABLE.items():
            sel = ((fr.defect_mask & bit) != 0) & rec
            t = table[c]
            t["n"] += int(sel.sum())
            t["median3"] += float(np.sum(merr[sel] ** 2))
            for code, name in FLAG_NAMES.items():
                on = sel & (flags == code) if code else None
                if code and on.any():
                    t["flagged"][name] = t["flagged"].get(name, 0.0) + float(np.sum(err[on] ** 2))
                    t["n_flagged"] += int(on.sum())
            miss = sel & (flags == 0)
            if isinstance(threshold, float):  # the head said defect, the optics' tests refused it
                t["missed_head"] += float(np.sum(err[miss & (head > threshold)] ** 2))
            b = np.digitize(dev[miss], EDGES[1:-1])
            e2 = err[miss] ** 2
            for i in range(len(EDGES) - 1):
                t["missed"][i] += float(e2[b == i].sum())
                t["missed_n"][i] += int((b == i).sum())
    labels = [f"{EDGES[i]:g}-{EDGES[i + 1]:g}" for i in range(len(EDGES) - 1)]
    for c, t in table.items():
        if not t["n"]:
            continue
        total = sum(t["flagged"].values()) + sum(t["missed"])
        rmse, mrmse = np.sqrt(total / t["n"]), np.sqrt(t["median3"] / t["n"])
        print(f"{c:10s} n {t['n']:6d} flagged {t['n_flagged'] / t['n']:5.1%}  RMSE {rmse:.4f} vs median3 {mrmse:.4f}"
              f" ({rmse / mrmse:.2f}x)")
        print("   SE share flagged: " + ", ".join(f"{k} {v / total:.1%}" for k, v in t["flagged"].items()))
        print("   SE share missed by |raw-truth|/sigma: " + ", ".join(
            f"{lab}: {v / total:.1%} ({n})" for lab, v, n in zip(labels, t["missed"], t["missed_n"])))
        print(f"   SE share missed where the head was above its threshold: {t['missed_head'] / total:.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "which": args.which, "frames": args.frames,
                                              "guard": json.loads(args.guard), "bins": labels, "table": table},
                                             indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
