"""Guard benchmark: what the output contract (``engine/guard.py``: noise model, impulse flags, the
k-sigma bound) costs beside the network, on the same frames in the same run.

Per frame size (uint16, a simulated camera frame), the whole frame path
(``engine.pipeline.denoise_frame`` on the shipped default, torch-cpu in the precision it serves in)
runs without and with the guard as the engine serves it (the package's calibrated defect head and the
learned flags' tests), the two interleaved frame by frame so that both see the same machine; the guard's
own time is taken inside the guarded path (in situ: after the network, with the caches as the network leaves
them). With the compiled impulse pass (engine/_impulse.c, where the install built it) on each of
``--compiled-threads`` (the engine serves one below 1024², two from there where it has two CPUs:
``guard.guard_threads``) and once with the NumPy pass; then the guard alone on the network's output, once per
thread count of the NumPy pass. The figure
of merit is the guard's in-situ time over the unguarded path's; the issue's limit: at most 15 % at 1024 x 1024.

    python bench/guard.py                      # 512², 1024²; the NumPy pass alone on 1 and 2 threads
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

from cdae.training.environment import cpu_id

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
    p.add_argument("--repeats", type=int, default=9, help="frames per path and pass (after one to warm up)")
    p.add_argument("--model", default="cdae-default:7")
    p.add_argument("--precision", default="auto", help="the network's, as torch-cpu serves it: auto, bf16 or fp32")
    p.add_argument("--threads", default="1,2", help="comma list: the guard timed alone with each thread count")
    p.add_argument("--compiled-threads", default="1,2", help="comma list: the compiled pass in situ with each "
                   "thread count (the first is the served figure: the engine's default, one)")
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
    compiled_threads = [int(t) for t in args.compiled_threads.split(",")]
    import time

    from cdae.engine import pipeline

    inner: list[float] = []

    def timed_guard(*a, **k):  # noqa: ANN002, ANN003, ANN202 - pipeline.guard, timed where the path calls it
        t0 = time.perf_counter()
        result = guard(*a, **k)
        inner.append(time.perf_counter() - t0)
        return result

    def interleaved(frame: np.ndarray) -> dict[str, float]:
        """Plain and guarded paths in turn, frame by frame; medians in ms (the first of each dropped)."""
        plain, guarded = [], []
        inner.clear()
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            denoise_frame(frame, backend, bit_depth=12)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            denoise_frame(frame, backend, bit_depth=12, guard_config=cfg)
            guarded.append(time.perf_counter() - t0)
        ms = {k: 1e3 * float(np.median(v[1:])) for k, v in (("path", plain), ("guarded", guarded), ("guard", inner))}
        ms["share"] = ms["guard"] / ms["path"]
        return ms

    pipeline.guard = timed_guard
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            _, det = simulate_frame(99, 0, n, n, 12)
            frame = np.clip(np.rint(det.noisy), 0, 4095).astype(np.uint16)
            passes = {}
            kinds = [f"compiled, {t} thread{'s' if t > 1 else ''}" for t in compiled_threads] \
                if guard_module.compiled_pass() else []
            for kind, t in zip(kinds + ["numpy"], compiled_threads + [None]):
                guard_module.use_compiled_pass(t is not None)
                guard_module.set_guard_threads(t)
                passes[kind] = interleaved(frame)
            guard_module.use_compiled_pass(True)
            guard_module.set_guard_threads(None)
            f = frame.astype(np.float32)
            x, offset, scale = network_input(f, 4095.0, backend.normalisation)
            restored, prob = backend.infer(x)
            out_dn = denormalise(restored, offset, scale)
            sat = x[1] > 0.5
            alone = {}
            guard_module.use_compiled_pass(False)
            for t in threads:
                guard_module.set_guard_threads(t)
                alone[t] = _median_ms(lambda: guard(f, out_dn, sat, cfg, prob), args.repeats)  # noqa: B023
            guard_module.set_guard_threads(None)
            guard_module.use_compiled_pass(True)
            served = passes[kinds[0]] if kinds else passes["numpy"]  # the engine's: one thread unless set
            counts = guard(f, out_dn, sat, cfg, prob).counts
            rows.append({"size": n, "path_ms": served["path"], "guarded_path_ms": served["guarded"],
                         "guard_ms": served["guard"], "guard_share": served["share"],
                         "impulse_pass": kinds[0] if kinds else "numpy",
                         "by_pass": passes, "numpy_guard_alone_ms_by_threads": {str(t): v for t, v in alone.items()},
                         "flags": counts})
            print(f"{n}²: " + "; ".join(
                f"{k} pass: path {v['path']:.1f} ms, guarded {v['guarded']:.1f} ms, guard in situ {v['guard']:.1f} ms"
                f" = {100 * v['share']:.1f} %" for k, v in passes.items())
                + "; NumPy guard alone " + ", ".join(f"{v:.1f} ms on {t} thread(s)" for t, v in alone.items())
                + f"; flags {counts}")
    finally:
        pipeline.guard = guard
    device = _device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "model": args.model, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "precision": backend.precision, "precision_choice": backend.choice, "cpu_count": os.cpu_count(),
              "cpu_id": cpu_id(),
              "repeats": args.repeats, "guard": cfg.model_dump(), "rows": rows}
    (out / f"guard-{device}.json").write_text(json.dumps(record, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    kinds = list(rows[0]["by_pass"])
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(rows))]
        paths = [r["by_pass"][kind]["path"] for r in rows]
        guards = [r["by_pass"][kind]["guard"] for r in rows]
        ax.bar(xs, paths, width * 0.95, color="#1f77b4", label="frame path (network, normalisation)" if j == 0 else None)
        ax.bar(xs, guards, width * 0.95, bottom=paths, color=("#ff7f0e", "#2ca02c", "#d62728", "#9467bd")[j % 4],
               label=f"guard, {kind} impulse pass")
        for x, p_, g_ in zip(xs, paths, guards):
            ax.text(x, p_ + g_, f"+{100 * g_ / p_:.1f} %", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [str(r["size"]) + "²" for r in rows])
    ax.set_ylabel("ms per frame")
    ax.set_title(f"{args.model} ({backend.precision}) on {device}: the guard in situ (limit 15 % at 1024²)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"guard-{device}.png", dpi=100)
    print(f"wrote {out / f'guard-{device}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
