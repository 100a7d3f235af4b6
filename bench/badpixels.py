"""Bad-pixel fill benchmark: what the camera's bad-pixel map costs the frame path per frame.

The engine's pipeline fills the listed pixels of every denoised frame (``BadPixelMap.fill_output``:
the denoised frame, the residual and the defect map), in its worker thread. Per frame size (uint16) and
map, the fill is timed beside the reference measured in the same run: copying the three outputs
(which the fill must do anyway, since it leaves its inputs alone). Maps like a damaged camera's:
hot/dead pixels at ``--fraction`` of the frame, two whole bad columns and one from a charge trap
to the bottom edge.

    python bench/badpixels.py                  # 512², 1024², 2048²
    python bench/badpixels.py --sizes 256 --repeats 5

Writes ``bench/results/badpixels-<device>.json`` and ``badpixels-<device>.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

from cdae.training.environment import cpu_id

ROOT = Path(__file__).resolve().parent.parent


def _device_name() -> str:
    spec = importlib.util.spec_from_file_location("cdae_bench_engine", ROOT / "bench" / "engine.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.device_name()  # type: ignore[attr-defined]


def damaged_camera_mask(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    mask = rng.random((n, n)) < fraction
    mask[:, n // 5] = True
    mask[:, n // 2] = True
    mask[n // 3:, (4 * n) // 5] = True
    return mask


def _median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm: the fill's plan for this frame size is made once
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--fraction", type=float, default=1e-3, help="hot/dead pixels, fraction of the frame")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)

    from cdae.engine.badpixels import BadPixelMap

    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        bp = BadPixelMap.from_mask(damaged_camera_mask(n, args.fraction, rng))
        denoised = rng.integers(0, 4096, (n, n)).astype(np.uint16)
        residual = rng.normal(0, 10, (n, n)).astype(np.float32)
        defect = rng.integers(0, 256, (n, n)).astype(np.uint8)
        copy_ms = _median_ms(lambda: (denoised.copy(), residual.copy(), defect.copy()), args.repeats)
        fill_ms = _median_ms(lambda: bp.fill_output(denoised, residual, defect), args.repeats)  # noqa: B023
        rows.append({"size": n, "listed_pixels": len(bp), "fill_ms": fill_ms, "copy_ms": copy_ms,
                     "fill_over_copy": fill_ms / copy_ms})
        print(f"{n}²: {len(bp)} listed pixels, fill {fill_ms:.2f} ms, copy of the outputs {copy_ms:.2f} ms "
              f"(ratio {fill_ms / copy_ms:.2f})")
    device = _device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "cpu_count": os.cpu_count(), "cpu_id": cpu_id(), "date": _dt.date.today().isoformat(),
              "fraction": args.fraction, "repeats": args.repeats, "rows": rows}
    (out / f"badpixels-{device}.json").write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["size"] for r in rows]
    ax.plot(sizes, [r["fill_ms"] for r in rows], "o-", label="fill listed pixels (denoised, residual, defect map)")
    ax.plot(sizes, [r["copy_ms"] for r in rows], "s--", label="reference: copy the three outputs")
    for r in rows:
        ax.annotate(f"{r['fill_over_copy']:.1f}x, {r['listed_pixels']} px", (r["size"], r["fill_ms"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.margins(x=0.2, y=0.25)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [f"{s}²" for s in sizes])
    ax.set_xlabel("frame (uint16)")
    ax.set_ylabel("ms per frame (median)")
    ax.set_title(f"Bad-pixel fill in the filter IOC, {device}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"badpixels-{device}.png", dpi=110)
    print(f"wrote {out / f'badpixels-{device}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
