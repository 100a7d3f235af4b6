"""End-to-end benchmark: simulated camera → filter IOC → engine → filter IOC → a separate CA client.

For each frame size (uint16, 12-bit) the whole pipeline runs twice in the same run: once with
the model on the best available backend, once with the pass-through engine (identity network,
same protocol and IOC path), each as real processes on loopback with their own CA ports.

- **latency** p50/p99 (ms): the raw frame's CA timestamp (stamped by the camera when it
  publishes) → the denoised ``ArrayData`` update received by this process (a separate client),
  with the camera at ``--latency-rate`` Hz so nothing queues;
- **max sustained rate** (Hz): the camera's ``FrameRate`` is stepped up; a step is sustained
  when, over ``--step-seconds``, the filter dropped no frame and published at least 90 % of
  what the camera sent. The highest sustained step is reported (the camera itself, pure
  Python, may be the limit at large sizes: its achieved rate is reported too);
- **IOC overhead**: ``1 - ExecutionTime / latency`` (share of end-to-end latency spent outside the
  engine: CA in and out, IOC, camera publish) and model/pass-through latency ratio.

    python bench/pipeline.py                          # 512² and 1024²
    python bench/pipeline.py --seconds 5 --sizes 512  # smoke

Writes ``bench/results/pipeline-<device>.json`` and ``pipeline-<device>.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cdae.children import ChildProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
RATES = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


def _engine_bench() -> object:
    spec = importlib.util.spec_from_file_location("cdae_bench_engine", ROOT / "bench" / "engine.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CAM_PORT, IOC_PORT = free_port(), free_port()
CA_ENV = {
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": f"127.0.0.1:{CAM_PORT} 127.0.0.1:{IOC_PORT}",
    "EPICS_CA_REPEATER_PORT": str(free_port()),
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_MAX_ARRAY_BYTES": str(256 * 1024 * 1024),
}
os.environ.update(CA_ENV)


class Proc(ChildProcess):
    """``cdae <args>`` as a child, waited for by its ready line; ``port`` is its CA server port."""

    def __init__(self, name: str, args: list[str], ready: str, log_dir: Path, port: int | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if port is not None:
            env.update(EPICS_CA_SERVER_PORT=str(port), EPICS_CAS_SERVER_PORT=str(port))
        super().__init__(name, [sys.executable, "-m", "cdae.cli", *args], env, ready, log_dir / f"{name}.log")
        self.wait_ready(600)

    @property
    def line(self) -> str:
        return self.ready_line


def _pct(v: list[float], p: float) -> float | None:
    return round(float(np.percentile(v, p)), 3) if v else None


def run_one(size: int, backend: str, store: Path, ref: str, args: argparse.Namespace, log_dir: Path) -> dict:
    from caproto.threading.client import Context

    cam_p, ioc_p = f"BENCH{size}:image1:", f"BENCH{size}:CDAE1:"
    procs: list[Proc] = []
    ctx = Context(timeout=10.0)
    try:
        eng = Proc("engine", ["engine", "--bind", "tcp://127.0.0.1:0", "--backend", backend, "--models", str(store),
                              "--model", ref], r"^cdae-engine ready ", log_dir)
        procs.append(eng)
        m = re.search(r"data=(\S+) control=(\S+) backend=(\S+)", eng.line)
        assert m is not None
        data_ep, control_ep, used_backend = m.groups()
        procs.append(Proc("camera", ["sim-camera", "--prefix", cam_p, "--size", f"{size}x{size}", "--rate",
                                     str(args.latency_rate), "--bank", "2"], r"^cdae-sim-camera ready ", log_dir,
                          CAM_PORT))
        procs.append(Proc("ioc", ["ioc", "--source", cam_p, "--prefix", ioc_p, "--engine", data_ep, "--control",
                                  control_ep, "--bit-depth", "12"], r"^cdae-ioc ready ", log_dir, IOC_PORT))
        names = ["ArrayData", "ArrayCounter_RBV", "DroppedArrays_RBV", "ExecutionTime_RBV", "EngineConnected_RBV"]
        pvs = dict(zip(names, ctx.get_pvs(*(ioc_p + n for n in names), timeout=10.0)))
        cam_rate, cam_count = ctx.get_pvs(cam_p + "FrameRate", cam_p + "ArrayCounter_RBV", timeout=10.0)

        def val(pv: object) -> float:
            return float(pv.read(timeout=10.0).data[0])  # type: ignore[attr-defined]

        deadline = time.monotonic() + 120
        while val(pvs["ArrayCounter_RBV"]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("no denoised frames within 120 s")
            time.sleep(0.2)
        # latency: raw CA timestamp → update received here
        lat: list[float] = []
        exe: list[float] = []

        def on_frame(sub: object, r: object) -> None:
            lat.append((time.time() - r.metadata.timestamp) * 1e3)  # type: ignore[attr-defined]

        sub = pvs["ArrayData"].subscribe(data_type="time", data_count=0)
        sub.add_callback(on_frame)
        t_end = time.monotonic() + args.seconds
        while time.monotonic() < t_end:
            time.sleep(0.5)
            exe.append(val(pvs["ExecutionTime_RBV"]))
        sub.clear()
        lat = lat[1:]  # the first update is the subscription's current value, not a fresh frame
        # the rate ramp: counters only (no image traffic to this process)
        sustained, steps = 0.0, []
        for rate in RATES:
            if rate > args.max_rate:
                break
            cam_rate.write([rate], wait=True, timeout=10.0)
            time.sleep(min(1.0, args.step_seconds / 3))  # let the new rate reach the filter
            d0, o0, c0, t0 = val(pvs["DroppedArrays_RBV"]), val(pvs["ArrayCounter_RBV"]), val(cam_count), time.monotonic()
            time.sleep(args.step_seconds)
            d1, o1, c1, t1 = val(pvs["DroppedArrays_RBV"]), val(pvs["ArrayCounter_RBV"]), val(cam_count), time.monotonic()
            sent, out = c1 - c0, o1 - o0
            ok = d1 == d0 and sent > 0 and out >= 0.9 * sent
            steps.append({"rate_hz": rate, "camera_hz": round(sent / (t1 - t0), 2), "out_hz": round(out / (t1 - t0), 2),
                          "dropped": int(d1 - d0), "sustained": ok})
            print(f"  {size}² {used_backend:11s} camera {rate:6.1f} Hz (achieved {sent / (t1 - t0):6.1f}) → out "
                  f"{out / (t1 - t0):6.1f} Hz, dropped {int(d1 - d0)}", flush=True)
            if not ok:
                break
            sustained = round(sent / (t1 - t0), 2)
            if sent / (t1 - t0) < 0.8 * rate:  # the camera itself cannot go faster
                break
        return {"size": size, "backend": used_backend, "frames": len(lat), "latency_ms": {"p50": _pct(lat, 50),
                "p99": _pct(lat, 99)}, "engine_execution_ms_p50": _pct(exe, 50),
                "max_sustained_rate_hz": sustained, "camera_limited": bool(steps and steps[-1]["sustained"]),
                "steps": steps, "latency_rate_hz": args.latency_rate}
    finally:
        ctx.disconnect()
        for p in reversed(procs):
            p.stop()


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = results["runs"]
    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    labels = [f"{r['size']}²\n{r['backend']}" for r in rows]
    x = np.arange(len(rows))
    axes[0].bar(x - 0.2, [r["latency_ms"]["p50"] or 0 for r in rows], 0.4, label="p50")
    axes[0].bar(x + 0.2, [r["latency_ms"]["p99"] or 0 for r in rows], 0.4, label="p99")
    axes[0].set_ylabel("raw timestamp → denoised received (ms)")
    axes[1].bar(x, [r["max_sustained_rate_hz"] for r in rows], 0.5)
    axes[1].set_ylabel("max sustained camera rate, no drops (Hz)")
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"cdae pipeline on {results['device']} — model {results['model']} ({results['model_note']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--backend", default="auto", help="backend of the model run (the other run is passthrough)")
    p.add_argument("--models", help="model store (default: the source tree's models/)")
    p.add_argument("--model", help="NAME[:VERSION] (default: cdae-default, else random weights)")
    p.add_argument("--seconds", type=float, default=10.0, help="latency measurement per run")
    p.add_argument("--latency-rate", type=float, default=2.0, help="camera Hz while measuring latency")
    p.add_argument("--step-seconds", type=float, default=3.0, help="seconds per rate step")
    p.add_argument("--max-rate", type=float, default=320.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    eb = _engine_bench()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = eb.device_name()  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        store, ref, note = eb.resolve_model(args.models, args.model, Path(tmp))  # type: ignore[attr-defined]
        results: dict = {"device": device, "model": ref, "model_note": note, "cpu_count": os.cpu_count(),
                         "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         "seconds": args.seconds, "runs": [], "overhead": []}
        for size in (int(s) for s in args.sizes.split(",")):
            pair = {}
            for backend in (args.backend, "passthrough"):
                log_dir = Path(tmp) / f"{size}-{backend}"
                log_dir.mkdir()
                print(f"{size}x{size} uint16, {backend} engine ...", flush=True)
                r = run_one(size, backend, store, ref, args, log_dir)
                results["runs"].append(r)
                pair[backend] = r
                print(f"  latency p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms "
                      f"({r['frames']} frames); engine {r['engine_execution_ms_p50']} ms; "
                      f"max sustained {r['max_sustained_rate_hz']} Hz", flush=True)
            model_run, pt = pair[args.backend], pair["passthrough"]
            ov = {"size": size}
            for name, r in (("model", model_run), ("passthrough", pt)):
                lat, exe = r["latency_ms"]["p50"], r["engine_execution_ms_p50"]
                ov[f"ioc_overhead_fraction_{name}"] = round(1 - exe / lat, 3) if lat and exe is not None else None
            if model_run["latency_ms"]["p50"] and pt["latency_ms"]["p50"]:
                ov["latency_ratio_model_over_passthrough"] = round(model_run["latency_ms"]["p50"] /
                                                                  pt["latency_ms"]["p50"], 2)
            results["overhead"].append(ov)
            print(f"  overhead: {ov}", flush=True)
    json_path = out / f"pipeline-{device}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"pipeline-{device}.png")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
