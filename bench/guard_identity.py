"""Bit-identity and speed of ``engine/guard.py`` against a reference copy of it (by default the guard before
its speed-up, read with ``git show a03c1cbae5b9:engine/guard.py``): same output, flags, counts and noise model on varied
simulated frames, and single-thread timings of both. Not a test: it needs the old copy.

    python bench/guard_identity.py [--ref PATH] [--time] [--repeat N]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import warnings

import numpy as np

from cdae.engine import guard as new
from cdae.training.config import DataConfig
from cdae.training.dataset import simulated_frames
from cdae.training.defects import DefectConfig


def load_ref(path: str | None):  # noqa: ANN201
    if path is None:
        src = subprocess.run(["git", "show", "a03c1cbae5b9:engine/guard.py"], check=True, capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1]).stdout
        path = str(Path(tempfile.mkdtemp()) / "guard_ref.py")
        Path(path).write_text(src)
    spec = importlib.util.spec_from_file_location("guard_ref", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["guard_ref"] = mod
    spec.loader.exec_module(mod)
    return mod


def cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, dict, np.ndarray | None]]:
    """(name, raw, denoised, saturated, config overrides, defect probability)."""
    rng = np.random.default_rng(7)
    out = []
    defects = DefectConfig.all_defects()
    sizes = [(256, 256), (200, 333), (128, 97), (512, 512)]
    for i, (data, tag) in enumerate([(DataConfig(bit_depths=[8]), "8bit"), (DataConfig(bit_depths=[12]), "12bit"),
                                     (DataConfig(bit_depths=[16]), "16bit"),
                                     (DataConfig(bit_depths=[8], defects=defects), "8bit-defects"),
                                     (DataConfig(bit_depths=[12], defects=defects), "12bit-defects"),
                                     (DataConfig(bit_depths=[16], defects=defects), "16bit-defects")]):
        for j in range(2):
            fr = simulated_frames(data, 11 + i, j, 1, [sizes[(i + j) % len(sizes)]])[0]
            raw = fr.noisy.astype(np.float32)
            sat = raw >= fr.adc_max
            den = (fr.clean + rng.normal(0, 2.0, raw.shape)).astype(np.float32)
            cfg: dict = {"defect_threshold": None}
            prob = None
            if j == 1:
                cfg = {"defect_threshold": 0.97, "gain_e_per_dn": 2.5, "read_noise_dn": 1.7}
                if i % 2:
                    cfg["offset_dn"] = float(np.percentile(raw, 1))
                prob = rng.random(raw.shape, dtype=np.float32)
            if i == 2 and j == 0:
                cfg["line_length"] = 1
            if i == 4 and j == 0:
                cfg["impulse_passes"] = 4
            if i in (1, 5):
                cfg["k_sigma"] = 2.5
            out.append((f"{tag}-{j}-{raw.shape}", raw, den, sat, cfg, prob))
    # float frames (not integer DN), and one near float32's limit
    raw, den, sat = out[4][1] * np.float32(0.37), out[4][2] * np.float32(0.37), out[4][3]
    out.append(("float-0.37", raw, den, sat, {"defect_threshold": None}, None))
    raw = out[9][1] * np.float32(1.3e-3) + np.float32(0.25)
    out.append(("float-small", raw, out[9][2] * np.float32(1.3e-3), out[9][3], {"defect_threshold": None}, None))
    big = out[0][1] * np.float32(2.0**70)
    out.append(("float-huge", big, out[0][2] * np.float32(2.0**70), out[0][3], {"defect_threshold": None}, None))
    for shape in [(3, 3), (1, 17), (2, 40), (17, 1), (5, 5), (70, 3), (130, 9)]:
        raw = rng.poisson(50, shape).astype(np.float32)
        if raw.size:
            raw.flat[raw.size // 2] = 4000
        out.append((f"tiny{shape}", raw, raw + np.float32(0.4), np.zeros(shape, bool), {"defect_threshold": None},
                    None))
    return out


def same(a, b) -> bool:  # noqa: ANN001
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def check(ref) -> int:  # noqa: ANN001
    bad = 0
    for name, raw, den, sat, over, prob in cases():
        results = []
        for mod in (ref, new):
            cfg = mod.GuardConfig(**over)
            r = mod.guard(raw, den, sat, cfg, prob)
            m = mod.find_impulses(raw, r.noise, cfg) if raw.size and min(raw.shape) >= 1 else None
            results.append((r, m))
        (a, ma), (b, mb) = results
        ok = same(a.output, b.output) and same(a.flags, b.flags) and a.counts == b.counts and \
            (a.noise.read_dn, a.noise.dn_per_e, a.noise.offset_dn, a.noise.measured) == \
            (b.noise.read_dn, b.noise.dn_per_e, b.noise.offset_dn, b.noise.measured)
        if ma is not None:
            ok = ok and same(ma[0], mb[0]) and same(ma[1], mb[1])
        bad += not ok
        print(f"{'ok  ' if ok else 'DIFF'} {name:32s} counts={b.counts}")
    print("identical" if not bad else f"{bad} case(s) differ")
    return bad


def timings(ref, repeat: int) -> None:  # noqa: ANN001
    frames = [("1024^2", simulated_frames(DataConfig(), 3, 0, 1, [(1024, 1024)])[0]),
              ("512^2", simulated_frames(DataConfig(), 3, 0, 1, [(512, 512)])[0]),
              ("1024^2 all defects", simulated_frames(DataConfig(defects=DefectConfig.all_defects()), 3, 0, 1,
                                                      [(1024, 1024)])[0])]
    for name, fr in frames:
        raw = fr.noisy.astype(np.float32)
        sat = raw >= fr.adc_max
        best = {}
        for mod in (ref, new):
            mod.guard(raw, raw, sat, mod.GuardConfig(defect_threshold=None))
        for _ in range(repeat):  # interleaved, best of: the cores are shared
            for label, mod in (("old", ref), ("new", new)):
                cfg = mod.GuardConfig(defect_threshold=None)
                s = time.perf_counter()
                mod.guard(raw, raw, sat, cfg)
                best[label] = min(best.get(label, 1e9), time.perf_counter() - s)
        print(f"{name:20s} old {best['old'] * 1e3:7.1f} ms  new {best['new'] * 1e3:7.1f} ms  "
              f"x{best['old'] / best['new']:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # the huge frame overflows in both, the same way
    ref = load_ref(args.ref)
    bad = check(ref)
    if args.time:
        timings(ref, args.repeat)
    sys.exit(1 if bad else 0)
