"""Soak: simulated camera → filter IOC → engine for minutes; every camera frame accounted for, memory flat.

Real processes on loopback with their own CA ports, as in ``bench/pipeline.py``. The camera starts
stopped, so the filter IOC sees its first frame (UniqueId 1) and the empty array on the PV before it
(UniqueId 0). Every ``--sample-s`` the IOC's books (published, drops by cause, errors, source gaps),
the resident memory of the three processes and the latency of the denoised frames as a separate CA
client receives them (raw frame's CA timestamp → update here) are sampled. At the end the camera
stops, the books settle, and the run checks

    published + dropped + errors + source gaps == camera frames (its last UniqueId + 1)

and fits the IOC's RSS over the second half of the run (MiB per minute).

    python bench/soak.py                                     # 2 minutes, 512², 10 Hz, passthrough engine
    python bench/soak.py --minutes 30 --size 1024 --rate 20  # the long one
    python bench/soak.py --backend auto --model cdae-default # a real backend

Not in ``make test``. Writes ``bench/results/soak-<device>-<size>-<rate>hz-<minutes>min.json`` and ``.png``.
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
import threading
import time
from pathlib import Path

import numpy as np

from cdae.training.environment import cpu_id

ROOT = Path(__file__).resolve().parent.parent

COUNTERS = ("ArrayCounter_RBV", "DroppedArrays_RBV", "FrameErrors_RBV", "SourceGaps_RBV", "FramesReceived_RBV")


def _bench_module(name: str):  # noqa: ANN202 - a sibling benchmark script
    spec = importlib.util.spec_from_file_location(f"cdae_bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the pipeline benchmark's processes: its CA environment (this process's own ports, set on import, before
# any CA client starts here), its child-process wrapper and percentiles, and the engine benchmark's helpers
_PIPELINE = _bench_module("pipeline")
CAM_PORT, IOC_PORT, Proc, _pct, _engine_bench = (_PIPELINE.CAM_PORT, _PIPELINE.IOC_PORT, _PIPELINE.Proc,
                                                 _PIPELINE._pct, _PIPELINE._engine_bench)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def soak(args: argparse.Namespace, store: Path, ref: str, log_dir: Path) -> dict:
    from caproto.threading.client import Context

    cam_p, ioc_p = "SOAK:image1:", "SOAK:CDAE1:"
    size = args.size
    procs: dict[str, Proc] = {}
    ctx = Context(timeout=10.0)
    try:
        procs["engine"] = Proc("engine", ["engine", "--bind", "tcp://127.0.0.1:0", "--backend", args.backend,
                                          "--models", str(store), "--model", ref, "--max-pixels", str(size * size)],
                               r"^cdae-engine ready ", log_dir)
        m = re.search(r"data=(\S+) control=(\S+) backend=(\S+)", procs["engine"].ready_line)
        assert m is not None
        data_ep, control_ep, backend = m.groups()
        procs["camera"] = Proc("camera", ["sim-camera", "--prefix", cam_p, "--size", f"{size}x{size}", "--rate",
                                          str(args.rate), "--bank", "4", "--stopped"], r"^cdae-sim-camera ready ",
                               log_dir, CAM_PORT)
        procs["ioc"] = Proc("ioc", ["ioc", "--source", cam_p, "--prefix", ioc_p, "--engine", data_ep, "--control",
                                    control_ep, "--bit-depth", "12"], r"^cdae-ioc ready ", log_dir, IOC_PORT)
        pvs = dict(zip(COUNTERS, ctx.get_pvs(*(ioc_p + n for n in COUNTERS), timeout=10.0)))
        causes_pv, connected_pv, array_pv = ctx.get_pvs(ioc_p + "DropCauses_RBV.VAL$", ioc_p + "EngineConnected_RBV",
                                                        ioc_p + "ArrayData", timeout=10.0)
        acquire, cam_uid = ctx.get_pvs(cam_p + "Acquire", cam_p + "UniqueId_RBV", timeout=10.0)

        def val(pv: object) -> int:
            return int(pv.read(timeout=10.0).data[0])  # type: ignore[attr-defined]

        def books() -> dict[str, object]:
            b: dict[str, object] = {n: val(pv) for n, pv in pvs.items()}
            raw = causes_pv.read(timeout=10.0, data_type="native").data  # type: ignore[attr-defined]
            text = bytes(bytearray(int(x) for x in raw)).split(b"\0")[0].decode()
            b["causes"] = dict((k, int(v)) for k, v in (kv.split("=") for kv in text.split()))
            return b

        deadline = time.monotonic() + 120
        while val(connected_pv) != 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the engine did not connect within 120 s")
            time.sleep(0.2)
        lat: list[tuple[float, float]] = []  # (t since start, ms)
        lock = threading.Lock()
        t_start = time.monotonic()

        def on_frame(sub: object, r: object) -> None:
            with lock:
                lat.append((time.monotonic() - t_start, (time.time() - r.metadata.timestamp) * 1e3))  # type: ignore[attr-defined]

        sub = array_pv.subscribe(data_type="time", data_count=0)
        sub.add_callback(on_frame)
        acquire.write([1], wait=True, timeout=10.0)
        samples = []
        t_end = t_start + 60 * args.minutes
        while time.monotonic() < t_end:
            time.sleep(args.sample_s)
            for name, p in procs.items():
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{name} died (exit {p.proc.returncode}); see {p.log_path}")
            s = {"t_s": round(time.monotonic() - t_start, 2), "camera_unique_id": val(cam_uid), **books(),
                 "rss_mib": {n: rss_mib(p.proc.pid) for n, p in procs.items()}}
            with lock:
                recent = [ms for t, ms in lat if t > s["t_s"] - args.sample_s]
            s["latency_ms_p50"], s["latency_ms_p99"] = _pct(recent, 50), _pct(recent, 99)
            samples.append(s)
            print(f"  {s['t_s']:7.1f} s: camera {s['camera_unique_id']}, published {s['ArrayCounter_RBV']}, "
                  f"dropped {s['DroppedArrays_RBV']}, errors {s['FrameErrors_RBV']}, gaps {s['SourceGaps_RBV']}, "
                  f"IOC RSS {s['rss_mib']['ioc']} MiB, latency p50 {s['latency_ms_p50']} ms", flush=True)
        acquire.write([0], wait=True, timeout=10.0)
        final, previous = books(), None
        deadline = time.monotonic() + 60
        while final != previous and time.monotonic() < deadline:  # settled: nothing in flight any more
            time.sleep(1.0)
            previous, final = final, books()
        sub.clear()
        camera_frames = val(cam_uid) + 1  # UniqueId 1.. plus the empty array on the PV at connection (UniqueId 0)
        accounted = (int(final["ArrayCounter_RBV"]) + int(final["DroppedArrays_RBV"]) + int(final["FrameErrors_RBV"])
                     + int(final["SourceGaps_RBV"]))
        half = [s for s in samples if s["t_s"] >= 30 * args.minutes]
        slope = None
        if len(half) >= 2:
            t = np.array([s["t_s"] for s in half]) / 60
            r = np.array([s["rss_mib"]["ioc"] for s in half], dtype=float)
            slope = round(float(np.polyfit(t, r, 1)[0]), 3)
        all_lat = [ms for _, ms in lat[1:]]  # the first update is the subscription's current value
        return {"size": size, "rate_hz": args.rate, "minutes": args.minutes, "backend": backend,
                "camera_frames": camera_frames, "final": final, "accounted": accounted,
                "unaccounted": camera_frames - accounted, "client_received": len(lat),
                "latency_ms": {"p50": _pct(all_lat, 50), "p99": _pct(all_lat, 99), "max": _pct(all_lat, 100)},
                "ioc_rss_mib_per_min_second_half": slope, "samples": samples,
                "latency_trace": [(round(t, 2), round(ms, 2)) for t, ms in lat[1:]]}
    finally:
        ctx.disconnect()
        for p in reversed(list(procs.values())):
            p.stop()


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = result["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    ax_rss, ax_n, ax_lat = fig.subplots(1, 3)
    for name in ("ioc", "engine", "camera"):
        ax_rss.plot(t, [x["rss_mib"][name] for x in s], label=name)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_ylim(bottom=0)
    ax_rss.legend(fontsize=7)
    ax_n.plot(t, [x["camera_unique_id"] for x in s], "k-", label="camera frames")
    ax_n.plot(t, [x["ArrayCounter_RBV"] for x in s], label="published")
    ax_n.plot(t, [x["DroppedArrays_RBV"] for x in s], label="dropped")
    ax_n.plot(t, [x["SourceGaps_RBV"] for x in s], label="source gaps")
    ax_n.plot(t, [x["FrameErrors_RBV"] for x in s], label="errors")
    ax_n.set_ylabel("frames")
    ax_n.legend(fontsize=7)
    tr = result["latency_trace"]
    ax_lat.plot([a / 60 for a, _ in tr], [b for _, b in tr], ",", alpha=0.5)
    ax_lat.set_ylabel("raw timestamp → denoised received (ms)")
    ax_lat.set_yscale("log")
    for ax in (ax_rss, ax_n, ax_lat):
        ax.set_xlabel("minutes")
    f = result["final"]
    fig.suptitle(f"cdae soak on {result['device']}: {result['size']}² at {result['rate_hz']:g} Hz, {result['backend']} "
                 f"engine, {result['minutes']:g} min — camera {result['camera_frames']} = published "
                 f"{f['ArrayCounter_RBV']} + dropped {f['DroppedArrays_RBV']} + errors {f['FrameErrors_RBV']} + gaps "
                 f"{f['SourceGaps_RBV']} (unaccounted {result['unaccounted']}); IOC RSS "
                 f"{result['ioc_rss_mib_per_min_second_half']} MiB/min", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--size", type=int, default=512, help="square frame side (uint16, 12-bit)")
    p.add_argument("--rate", type=float, default=10.0, help="camera frames per second")
    p.add_argument("--backend", default="passthrough", help="engine backend (passthrough: the IOC and CA are loaded)")
    p.add_argument("--models", help="model store (default: the source tree's models/)")
    p.add_argument("--model", help="NAME[:VERSION] (default: cdae-default, else random weights)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    eb = _engine_bench()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = eb.device_name()  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        store, ref, note = eb.resolve_model(args.models, args.model, Path(tmp))  # type: ignore[attr-defined]
        print(f"soak {args.minutes:g} min, {args.size}x{args.size} at {args.rate:g} Hz, {args.backend} engine ...",
              flush=True)
        result = {"device": device, "model": ref, "model_note": note, "cpu_count": os.cpu_count(), "cpu_id": cpu_id(),
                  "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  **soak(args, store, ref, Path(tmp))}
    stem = f"soak-{device}-{args.size}-{args.rate:g}hz-{args.minutes:g}min"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{stem}.png")
    f = result["final"]
    print(f"camera {result['camera_frames']} frames = published {f['ArrayCounter_RBV']} + dropped "
          f"{f['DroppedArrays_RBV']} {f['causes']} + errors {f['FrameErrors_RBV']} + source gaps {f['SourceGaps_RBV']}"
          f": unaccounted {result['unaccounted']}; IOC RSS slope (second half) "
          f"{result['ioc_rss_mib_per_min_second_half']} MiB/min; latency {result['latency_ms']}")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0 if result["unaccounted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
