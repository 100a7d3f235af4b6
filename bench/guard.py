"""Guard benchmark: what the output contract (``engine/guard.py``: noise model, impulse flags, the
k-sigma bound) costs beside the network, on the same frames in the same run.

Per frame size (uint16, a simulated camera frame), the whole frame path
(``engine.pipeline.denoise_frame`` on the shipped default, torch-cpu in the precision it serves in)
is timed with and without the guard as the engine serves it (the package's calibrated defect head
and the learned flags' tests), and the guard alone on the network's output, once per thread count
of its impulse pass; the figure of merit is the guard's share of the unguarded path. The issue's
limit: at most 15 % at 1024 x 1024.

    python bench/guard.py                      # 512², 1024²; the guard on 1 and 2 threads
    python bench/guard.py --sizes 1024 --threads 1,2,4,8,16

Writes ``bench/results/guard-<device>.json`` and ``guard-<device>.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _bench_module(name: str):  # noqa: ANN202 - a sibling benchmark script, for its timing helpers
    spec = importlib.util.spec_from_file_location(f"cdae_bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="cdae-default:7")
    p.add_argument("--precision", default="auto", help="the network's, as torch-cpu serves it: auto, bf16 or fp32")
    p.add_argument("--threads", default="1,2", help="comma list: the guard timed alone with each thread count")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)

    from cdae.engine import guard as guard_module
    from cdae.engine.backends.torch_backend import TorchCPUBackend
    from cdae.engine.guard import GuardConfig, for_package, guard
    from cdae.engine.inference import Denoiser
    from cdae.engine.normalise import denormalise, network_input
    from cdae.engine.package import ModelRegistry
    from cdae.engine.pipeline import denoise_frame
    from cdae.training.defects import simulate_frame

    helpers = _bench_module("badpixels")  # the same device name and median timing as the fill's benchmark
    _median_ms, _device_name = helpers._median_ms, helpers._device_name
    pkg = ModelRegistry(ROOT / "models").resolve(args.model)
    den = Denoiser.from_package(pkg)
    backend = TorchCPUBackend(den.manifest, den.backend.model, precision=args.precision)
    cfg = for_package(GuardConfig(), pkg)  # as the engine serves it: the calibrated head, the learned-flag tests
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        _, det = simulate_frame(99, 0, n, n, 12)
        frame = np.clip(np.rint(det.noisy), 0, 4095).astype(np.uint16)
        plain = _median_ms(lambda: denoise_frame(frame, backend, bit_depth=12), args.repeats)  # noqa: B023
        guarded = _median_ms(lambda: denoise_frame(frame, backend, bit_depth=12, guard_config=cfg),  # noqa: B023
                             args.repeats)
        f = frame.astype(np.float32)
        x, offset, scale = network_input(f, 4095.0, backend.normalisation)
        restored, prob = backend.infer(x)
        out_dn = denormalise(restored, offset, scale)
        sat = x[1] > 0.5
        alone = {}
        for t in threads:
            guard_module.set_guard_threads(t)
            alone[t] = _median_ms(lambda: guard(f, out_dn, sat, cfg, prob), args.repeats)  # noqa: B023
        guard_module.set_guard_threads(None)
        best = min(alone.values())
        counts = guard(f, out_dn, sat, cfg, prob).counts
        rows.append({"size": n, "path_ms": plain, "guarded_path_ms": guarded, "guard_ms": best,
                     "guard_ms_by_threads": {str(t): v for t, v in alone.items()}, "guard_share": best / plain,
                     "guarded_over_plain": guarded / plain, "flags": counts})
        print(f"{n}²: path {plain:.1f} ms, guarded {guarded:.1f} ms ({guarded / plain:.3f}x), guard alone "
              + ", ".join(f"{v:.1f} ms on {t} thread(s)" for t, v in alone.items())
              + f" = {100 * best / plain:.1f} % of the path at best; flags {counts}")
    device = _device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "model": args.model, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "precision": backend.precision, "precision_choice": backend.choice, "cpu_count": os.cpu_count(),
              "repeats": args.repeats, "guard": cfg.model_dump(), "rows": rows}
    (out / f"guard-{device}.json").write_text(json.dumps(record, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    sizes = [str(r["size"]) + "²" for r in rows]
    ax.bar(sizes, [r["path_ms"] for r in rows], label="frame path (network, normalisation)", color="#1f77b4")
    ax.bar(sizes, [r["guard_ms"] for r in rows], bottom=[r["path_ms"] for r in rows], color="#ff7f0e",
           label="guard (noise model, impulses, bound)")
    for i, r in enumerate(rows):
        ax.text(i, r["path_ms"] + r["guard_ms"], f"+{100 * r['guard_share']:.0f} %", ha="center", va="bottom")
    ax.set_ylabel("ms per frame")
    ax.set_title(f"{args.model} ({backend.precision}) on {device}: the guard's cost, best of "
                 f"{','.join(map(str, threads))} thread(s)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"guard-{device}.png", dpi=100)
    print(f"wrote {out / f'guard-{device}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
