"""Guard benchmark: what the output contract (``engine/guard.py``: noise model, impulse flags, the
k-sigma bound) costs beside the network, on the same frames in the same run.

Per frame size (uint16, a simulated camera frame), the whole frame path
(``engine.pipeline.denoise_frame`` on the shipped default, torch-cpu) is timed with and without
the guard, and the guard alone; the figure of merit is the guard's share of the unguarded path.
The issue's limit: at most 15 % at 1024 x 1024.

    python bench/guard.py                      # 512², 1024²
    python bench/guard.py --sizes 1024 --repeats 5

Writes ``bench/results/guard-<device>.json`` and ``guard-<device>.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
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
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)

    from cdae.engine.guard import GuardConfig, guard
    from cdae.engine.inference import Denoiser
    from cdae.engine.normalise import network_input
    from cdae.engine.package import ModelRegistry
    from cdae.engine.pipeline import denoise_frame
    from cdae.training.defects import simulate_frame

    helpers = _bench_module("badpixels")  # the same device name and median timing as the fill's benchmark
    _median_ms, _device_name = helpers._median_ms, helpers._device_name
    den = Denoiser.from_package(ModelRegistry(ROOT / "models").resolve(args.model))
    cfg = GuardConfig()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        _, det = simulate_frame(99, 0, n, n, 12)
        frame = np.clip(np.rint(det.noisy), 0, 4095).astype(np.uint16)
        plain = _median_ms(lambda: denoise_frame(frame, den.backend, bit_depth=12), args.repeats)  # noqa: B023
        guarded = _median_ms(lambda: denoise_frame(frame, den.backend, bit_depth=12, guard_config=cfg),  # noqa: B023
                             args.repeats)
        f = frame.astype(np.float32)
        x, _, _ = network_input(f, 4095.0, den.manifest.normalisation)
        sat = x[1] > 0.5
        alone = _median_ms(lambda: guard(f, f, sat, cfg), args.repeats)  # noqa: B023
        counts = guard(f, f, sat, cfg).counts
        rows.append({"size": n, "path_ms": plain, "guarded_path_ms": guarded, "guard_ms": alone,
                     "guard_share": alone / plain, "guarded_over_plain": guarded / plain, "flags": counts})
        print(f"{n}²: path {plain:.1f} ms, guarded {guarded:.1f} ms ({guarded / plain:.3f}x), guard alone "
              f"{alone:.1f} ms = {100 * alone / plain:.1f} % of the path; flags {counts}")
    device = _device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "model": args.model, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(),
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
    ax.set_title(f"{args.model} on {device}: the guard's cost", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"guard-{device}.png", dpi=100)
    print(f"wrote {out / f'guard-{device}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
