"""Frame-path benchmark: what the compiled conversions (engine/_frame.c) save beside the NumPy they replace.

Every frame, whatever the model, is converted three times on the engine's CPU: the camera's integer frame
into the network input (``engine.normalise.network_input``), the output back to the camera's type
(``engine.normalise.to_dtype``) and the defect probability into the wire's uint8
(``engine.protocol.defect_map_to_wire``). Per frame size and camera type (a simulated 12-bit uint16 frame and
the same scene in uint8), each step is timed compiled and with NumPy, interleaved repeat by repeat so that
both see the same machine, and so is the engine's whole per-frame work without a network (the passthrough
backend: normalise, denormalise, cast, residual, then the defect map for the wire). Same bits either way
(tests/engine/test_frame_kernels.py). The figure of merit is NumPy's time over the compiled one's.

    python bench/frame_path.py                  # 512², 1024², 2048²
    python bench/frame_path.py --sizes 1024 --repeats 31

Writes ``bench/results/frame-path-<device>.json`` and ``frame-path-<device>.png``.
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


def interleaved_ms(steps: dict, repeats: int) -> dict[str, dict[str, float]]:
    """{step: {"compiled": ms, "numpy": ms, "ratio": numpy/compiled}}: medians over ``repeats``, the two ways in
    turn for each repeat (one warm-up of each first)."""
    from cdae.engine import frame_kernels

    times: dict[str, dict[str, list[float]]] = {k: {"compiled": [], "numpy": []} for k in steps}
    for i in range(repeats + 1):
        for name, fn in steps.items():
            for way in ("compiled", "numpy"):
                frame_kernels.use_compiled(way == "compiled")
                t0 = time.perf_counter()
                fn()
                if i:
                    times[name][way].append(time.perf_counter() - t0)
    frame_kernels.use_compiled(True)
    out = {}
    for name, t in times.items():
        c, n = (1e3 * float(np.median(t[w])) for w in ("compiled", "numpy"))
        out[name] = {"compiled": c, "numpy": n, "ratio": n / c}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--repeats", type=int, default=21, help="repeats per step and way (after one to warm up)")
    p.add_argument("--model", default="cdae-default:11", help="whose manifest (normalisation) the passthrough uses")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)

    from cdae.engine import frame_kernels
    from cdae.engine.backends.passthrough import PassthroughBackend
    from cdae.engine.package import ModelRegistry, load_model
    from cdae.engine.pipeline import denoise_frame
    from cdae.engine.normalise import adc_max_for, denormalise, network_input, to_dtype
    from cdae.engine.protocol import defect_map_to_wire
    from cdae.training.defects import simulate_frame

    if not frame_kernels.compiled():
        raise SystemExit("engine/_frame.c is not built in this install: nothing to compare")
    manifest, _ = load_model(ModelRegistry(ROOT / "models").resolve(args.model))
    runner = PassthroughBackend(manifest)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        _, det = simulate_frame(99, 0, n, n, 12)
        cameras = {"uint16 (12-bit)": (np.clip(np.rint(det.noisy), 0, 4095).astype(np.uint16), 12),
                   "uint8": (np.clip(np.rint(det.noisy / 16.0), 0, 255).astype(np.uint8), 8)}
        prob = np.random.default_rng(n).beta(0.3, 3.0, (n, n)).astype(np.float32)  # mostly near 0, as served
        for camera, (frame, bits) in cameras.items():
            adc = adc_max_for(frame.dtype, bits)
            x, offset, scale = network_input(frame, adc, runner.normalisation)
            out_dn = denormalise(x[0] + np.float32(0.01), offset, scale)  # an output a little off the input

            def engine_frame(frame: np.ndarray = frame, bits: int = bits) -> None:
                r = denoise_frame(frame, runner, bit_depth=bits)
                defect_map_to_wire(prob, "uint8")  # passthrough's map is all 0; the wire conversion of a real one
                del r

            steps = {
                "network_input": lambda frame=frame, adc=adc: network_input(frame, adc, runner.normalisation),
                "to_dtype": lambda out_dn=out_dn, frame=frame, adc=adc: to_dtype(out_dn, frame.dtype, adc),
                "defect_map_to_wire": lambda: defect_map_to_wire(prob, "uint8"),
                "engine frame (passthrough)": engine_frame,
            }
            ms = interleaved_ms(steps, args.repeats)
            rows.append({"size": n, "camera": camera, "ms": ms})
            print(f"{n}² {camera}: " + "; ".join(
                f"{k} {v['numpy']:.2f} -> {v['compiled']:.2f} ms ({v['ratio']:.2f}x)" for k, v in ms.items()))
    device = _device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "model": args.model, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "cpu_count": os.cpu_count(), "cpu_id": cpu_id(), "repeats": args.repeats, "rows": rows}
    (out / f"frame-path-{device}.json").write_text(json.dumps(record, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step_names = list(rows[0]["ms"])
    fig, axes = plt.subplots(1, len(step_names), figsize=(3.0 * len(step_names), 3.6))
    for ax, step in zip(axes, step_names):
        labels = [f"{r['size']}²\n{r['camera'].split()[0]}" for r in rows]
        xs = np.arange(len(rows))
        ax.bar(xs - 0.2, [r["ms"][step]["numpy"] for r in rows], 0.4, color="#999999", label="NumPy")
        ax.bar(xs + 0.2, [r["ms"][step]["compiled"] for r in rows], 0.4, color="#1f77b4", label="compiled")
        for x, r in zip(xs, rows):
            ax.text(x + 0.2, r["ms"][step]["compiled"], f"{r['ms'][step]['ratio']:.1f}x", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(step, fontsize=9)
        ax.set_ylabel("ms per frame (log)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"frame-path conversions on {device}: NumPy vs engine/_frame.c (same bits)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"frame-path-{device}.png", dpi=100)
    print(f"wrote {out / f'frame-path-{device}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
