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

``--outputs ca,pva,both`` measures the output side instead, on the pass-through engine, once per
output: the denoised frames read by a CA client only (``ArrayData``, caproto), by a PVA client only
(``Pva1:Image``, p4p; the IOC runs with ``--pva``), or by both at once. The camera stays on CA.
Reported per output: the max sustained rate (no drops, and every client received at least 90 %
of the camera's frames), latency p50/p99 per client (raw timestamp → received here), and the
IOC's CPU time per published frame (``/proc/PID/stat``), each as a ratio against CA only.

    python bench/pipeline.py --outputs ca,pva,both --sizes 1024,2048

Writes ``bench/results/pipeline-pva-<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cdae.children import ChildProcess, free_port, pva_loopback_env, pva_server_env
from cdae.training.environment import cpu_id

ROOT = Path(__file__).resolve().parent.parent
RATES = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


def _engine_bench() -> object:
    spec = importlib.util.spec_from_file_location("cdae_bench_engine", ROOT / "bench" / "engine.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CAM_PORT, IOC_PORT, IOC_PVA_PORT = free_port(), free_port(), free_port()
CA_ENV = {
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": f"127.0.0.1:{CAM_PORT} 127.0.0.1:{IOC_PORT}",
    "EPICS_CA_REPEATER_PORT": str(free_port()),
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_MAX_ARRAY_BYTES": str(256 * 1024 * 1024),
}
os.environ.update(CA_ENV)
# PV Access on loopback only: this process searches the filter IOC's own port; beacons stay on 127.0.0.1
os.environ.update(pva_loopback_env([IOC_PVA_PORT]))
OUTPUTS = ("ca", "pva", "both")


class Proc(ChildProcess):
    """``cdae <args>`` as a child, waited for by its ready line; ``port`` is its CA server port."""

    def __init__(self, name: str, args: list[str], ready: str, log_dir: Path, port: int | None = None,
                 env_extra: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
        if port is not None:
            env.update(EPICS_CA_SERVER_PORT=str(port), EPICS_CAS_SERVER_PORT=str(port))
        super().__init__(name, [sys.executable, "-m", "cdae.cli", *args], env, ready, log_dir / f"{name}.log")
        self.wait_ready(600)

    @property
    def line(self) -> str:
        return self.ready_line


def _pct(v: list[float], p: float) -> float | None:
    return round(float(np.percentile(v, p)), 3) if v else None


def start_stack(size: int, backend: str, store: Path, ref: str, args: argparse.Namespace, log_dir: Path,
                procs: list[Proc], ioc_args: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """Engine, camera (at ``--latency-rate``) and filter IOC, appended to ``procs`` as they start; returns
    the camera's and the IOC's prefixes and the engine's backend once the IOC has published two frames."""
    from caproto.threading.client import Context

    cam_p, ioc_p = f"BENCH{size}:image1:", f"BENCH{size}:CDAE1:"
    eng = Proc("engine", ["engine", "--bind", "tcp://127.0.0.1:0", "--backend", backend, "--models", str(store),
                          "--model", ref, *getattr(args, "engine_args", "").split()], r"^cdae-engine ready ", log_dir)
    procs.append(eng)
    m = re.search(r"data=(\S+) control=(\S+) backend=(\S+)", eng.line)
    assert m is not None
    data_ep, control_ep, used_backend = m.groups()
    procs.append(Proc("camera", ["sim-camera", "--prefix", cam_p, "--size", f"{size}x{size}", "--rate",
                                 str(args.latency_rate), "--bank", "2"], r"^cdae-sim-camera ready ", log_dir,
                      CAM_PORT))
    ioc_args = (*ioc_args, *getattr(args, "ioc_args", "").split())
    procs.append(Proc("ioc", ["ioc", "--source", cam_p, "--prefix", ioc_p, "--engine", data_ep, "--control",
                              control_ep, "--bit-depth", "12", *ioc_args], r"^cdae-ioc ready ", log_dir, IOC_PORT,
                      env_extra=pva_server_env(IOC_PVA_PORT)))
    ctx = Context(timeout=10.0)
    try:
        (counter,) = ctx.get_pvs(ioc_p + "ArrayCounter_RBV", timeout=10.0)
        deadline = time.monotonic() + 120
        while float(counter.read(timeout=10.0).data[0]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("no denoised frames within 120 s")
            time.sleep(0.2)
    finally:
        ctx.disconnect()
    return cam_p, ioc_p, used_backend


def _val(pv: object) -> float:
    return float(pv.read(timeout=10.0).data[0])  # type: ignore[attr-defined]


def run_one(size: int, backend: str, store: Path, ref: str, args: argparse.Namespace, log_dir: Path) -> dict:
    from caproto.threading.client import Context

    procs: list[Proc] = []
    ctx = Context(timeout=10.0)
    try:
        cam_p, ioc_p, used_backend = start_stack(size, backend, store, ref, args, log_dir, procs)
        names = ["ArrayData", "ArrayCounter_RBV", "DroppedArrays_RBV", "ExecutionTime_RBV", "EngineConnected_RBV"]
        pvs = dict(zip(names, ctx.get_pvs(*(ioc_p + n for n in names), timeout=10.0)))
        cam_rate, cam_count = ctx.get_pvs(cam_p + "FrameRate", cam_p + "ArrayCounter_RBV", timeout=10.0)
        val = _val
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
        ioc_pid = procs[-1].proc.pid
        sustained, steps = rate_ramp(args, cam_rate, lambda: (time.monotonic(), val(cam_count), val(
            pvs["ArrayCounter_RBV"]), val(pvs["DroppedArrays_RBV"]), cpu_s(ioc_pid)), {}, f"{size}² {used_backend:11s}")
        return {"size": size, "backend": used_backend, "frames": len(lat), "latency_ms": {"p50": _pct(lat, 50),
                "p99": _pct(lat, 99)}, "engine_execution_ms_p50": _pct(exe, 50),
                "max_sustained_rate_hz": sustained, "camera_limited": bool(steps and steps[-1]["sustained"]),
                "steps": steps, "latency_rate_hz": args.latency_rate}
    finally:
        ctx.disconnect()
        for p in reversed(procs):
            p.stop()


def rate_ramp(args: argparse.Namespace, cam_rate: object, books: Callable[[], tuple[float, ...]],
              clients: dict[str, int], label: str) -> tuple[float, list[dict]]:
    """Step the camera's ``FrameRate`` up until a step is not sustained, then narrow the gap between the last
    sustained step and the first that was not by ``--refine`` geometric midpoints (each sustained or not, as the
    steps are); returns the highest sustained rate and the steps.

    ``books()``: (monotonic time, camera frames, published, dropped, IOC CPU s, then what each client received, at
    the index ``clients`` gives). Sustained: nothing dropped, and the IOC published and every client received at
    least 90 % of what the camera sent, less one frame (still in flight when the step's window closes: at 2 Hz
    a 4 s step is 8 frames, and a 2048² frame takes a few hundred ms end to end)."""
    steps: list[dict] = []

    def step(rate: float) -> tuple[bool, float]:  # (sustained, the camera's achieved rate)
        cam_rate.write([rate], wait=True, timeout=10.0)  # type: ignore[attr-defined]
        time.sleep(min(1.0, args.step_seconds / 3))  # let the new rate reach the filter
        b0 = books()
        time.sleep(args.step_seconds)
        b1 = books()
        dt, sent, out, drops = b1[0] - b0[0], b1[1] - b0[1], b1[2] - b0[2], int(b1[3] - b0[3])
        got = {k: b1[5 + i] - b0[5 + i] for k, i in clients.items()}
        enough = 0.9 * sent - 1
        ok = drops == 0 and sent > 0 and out >= enough and all(g >= enough for g in got.values())
        steps.append({"rate_hz": rate, "camera_hz": round(sent / dt, 2), "out_hz": round(out / dt, 2),
                      "received_hz": {k: round(g / dt, 2) for k, g in got.items()}, "dropped": drops,
                      "ioc_cpu_ms_per_frame": round((b1[4] - b0[4]) / out * 1e3, 3) if out else None,
                      "ioc_cpu_fraction": round((b1[4] - b0[4]) / dt, 3), "sustained": ok})
        received = "".join(f", {k} client {g / dt:.1f} Hz" for k, g in got.items())
        print(f"  {label} camera {rate:6.1f} Hz (achieved {sent / dt:6.1f}) → out {out / dt:6.1f} Hz{received}, "
              f"dropped {drops}, IOC {steps[-1]['ioc_cpu_ms_per_frame']} ms CPU/frame", flush=True)
        return ok, sent / dt

    sustained, good, bad = 0.0, 0.0, None
    for rate in RATES:
        if rate > args.max_rate:
            break
        ok, achieved = step(rate)
        if not ok:
            bad = rate
            break
        sustained, good = round(achieved, 2), rate
        if achieved < 0.8 * rate:  # the camera itself cannot go faster
            break
    for _ in range(args.refine if bad is not None and good > 0 else 0):
        rate = round(math.sqrt(good * bad), 1)
        if not good < rate < bad:
            break
        time.sleep(min(2.0, args.step_seconds))  # the failed step's backlog drains at the lower rate
        ok, achieved = step(rate)
        if ok:
            sustained, good = max(sustained, round(achieved, 2)), rate
        else:
            bad = rate
    return sustained, steps


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat`` utime and stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client:
    """One consumer of the denoised frames in this process: CA (caproto, ``ArrayData``) or PVA (p4p, ``Pva1:Image``).

    Counts what it received and the latency of each frame: the raw frame's timestamp → received here."""

    def __init__(self, kind: str, ioc_p: str, ca_ctx: object) -> None:
        import threading

        self.kind, self.received, self.lat = kind, 0, []
        self.recording = False
        self._lock = threading.Lock()
        if kind == "ca":
            (pv,) = ca_ctx.get_pvs(ioc_p + "ArrayData", timeout=10.0)  # type: ignore[attr-defined]
            self._sub = pv.subscribe(data_type="time", data_count=0)
            self._sub.add_callback(self._on_ca)  # held weakly by caproto: a bound method of this object
        elif kind == "pyepics":  # ``ioc_p`` is any areaDetector prefix here: the camera's or the filter's
            import epics

            # arrays above pyepics' AUTOMONITOR_MAXLENGTH are not monitored unless asked for
            self._sub = epics.PV(ioc_p + "ArrayData", form="time", auto_monitor=True, callback=self._on_pyepics)
            if not self._sub.wait_for_connection(timeout=10.0):
                raise RuntimeError(f"pyepics: {ioc_p}ArrayData did not connect")
        else:
            from p4p.client.thread import Context

            self._pva = Context("pva", nt=False)
            self._sub = self._pva.monitor(ioc_p + "Pva1:Image", self._on_pva)

    def _record(self, stamp_s: float) -> None:
        ms = (time.time() - stamp_s) * 1e3
        with self._lock:
            self.received += 1
            if self.recording:
                self.lat.append(ms)

    def _on_ca(self, sub: object, r: object) -> None:
        self._record(r.metadata.timestamp)  # type: ignore[attr-defined]

    def _on_pyepics(self, timestamp: float | None = None, **kw: object) -> None:
        if timestamp:
            self._record(timestamp)

    def _on_pva(self, v: object) -> None:
        if isinstance(v, Exception) or v["value"] is None:  # type: ignore[index]
            return
        ts = v["timeStamp"]  # type: ignore[index]
        self._record(ts["secondsPastEpoch"] + ts["nanoseconds"] * 1e-9)

    def count(self) -> int:
        with self._lock:
            return self.received

    def close(self) -> None:
        if self.kind == "ca":
            self._sub.clear()
        elif self.kind == "pyepics":
            self._sub.clear_callbacks()
            self._sub.disconnect()
        else:
            self._sub.close()
            self._pva.close()


def _ramp_record(args: argparse.Namespace, sustained: float, steps: list[dict], load: list[float]) -> dict:
    return {"latency_rate_hz": args.latency_rate, "max_sustained_rate_hz": sustained,
            "camera_limited": bool(steps and steps[-1]["sustained"]), "steps": steps,
            "loadavg_before": load, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def _stop_all(clients: list[Client], ctx: object, procs: list[Proc]) -> None:
    for c in clients:
        c.close()
    ctx.disconnect()  # type: ignore[attr-defined]
    for p in reversed(procs):
        p.stop()


def run_outputs(size: int, output: str, store: Path, ref: str, args: argparse.Namespace, log_dir: Path) -> dict:
    """The pass-through pipeline with the denoised frames read over CA, PVA or both (see the module's doc)."""
    from caproto.threading.client import Context

    procs: list[Proc] = []
    clients: list[Client] = []
    ctx = Context(timeout=10.0)
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        cam_p, ioc_p, _ = start_stack(size, "passthrough", store, ref, args, log_dir, procs,
                                      ("--pva",) if output != "ca" else ())
        ioc_pid = procs[-1].proc.pid
        counter, dropped = ctx.get_pvs(ioc_p + "ArrayCounter_RBV", ioc_p + "DroppedArrays_RBV", timeout=10.0)
        cam_rate, cam_count = ctx.get_pvs(cam_p + "FrameRate", cam_p + "ArrayCounter_RBV", timeout=10.0)
        clients = [Client(k, ioc_p, ctx) for k in (("ca", "pva") if output == "both" else (output,))]
        time.sleep(1.0)

        def books() -> tuple[float, ...]:
            return (time.monotonic(), _val(cam_count), _val(counter), _val(dropped), cpu_s(ioc_pid),
                    *(c.count() for c in clients))

        # latency (and CPU per frame) at a rate where nothing queues
        for c in clients:
            c.recording = True
        b0 = books()
        time.sleep(args.seconds)
        b1 = books()
        for c in clients:
            c.recording = False
        latency = {c.kind: {"p50": _pct(c.lat[1:], 50), "p99": _pct(c.lat[1:], 99), "frames": len(c.lat)}
                   for c in clients}
        published = b1[2] - b0[2]
        cpu_latency = round((b1[4] - b0[4]) / published * 1e3, 3) if published else None
        sustained, steps = rate_ramp(args, cam_rate, books, {c.kind: i for i, c in enumerate(clients)},
                                     f"{size}² {output:4s}")
        return {"size": size, "output": output, "latency_ms": latency,
                "ioc_cpu_ms_per_frame_at_latency_rate": cpu_latency, **_ramp_record(args, sustained, steps, load)}
    finally:
        _stop_all(clients, ctx, procs)


def run_raw(size: int, path: str, store: Path, ref: str, args: argparse.Namespace, log_dir: Path) -> dict:
    """One pyepics client on the camera's own ArrayData (``path="raw"``: the camera alone), or on the filter
    IOC's with the pass-through engine (``path="filter"``); latency at ``--latency-rate``, then the rate ramp."""
    from caproto.threading.client import Context

    procs: list[Proc] = []
    clients: list[Client] = []
    ctx = Context(timeout=10.0)
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        if path == "raw":
            cam_p = f"BENCH{size}:image1:"
            procs.append(Proc("camera", ["sim-camera", "--prefix", cam_p, "--size", f"{size}x{size}", "--rate",
                                         str(args.latency_rate), "--bank", "2"], r"^cdae-sim-camera ready ", log_dir,
                              CAM_PORT))
            target = cam_p
        else:
            cam_p, target, _ = start_stack(size, "passthrough", store, ref, args, log_dir, procs)
        server_pid = procs[-1].proc.pid  # the camera (raw) or the filter IOC: the process the client reads from
        cam_rate, cam_count = ctx.get_pvs(cam_p + "FrameRate", cam_p + "ArrayCounter_RBV", timeout=10.0)
        if path == "raw":
            counter = dropped = None
        else:
            counter, dropped = ctx.get_pvs(target + "ArrayCounter_RBV", target + "DroppedArrays_RBV", timeout=10.0)
        client = Client("pyepics", target, ctx)
        clients.append(client)
        time.sleep(1.0)

        def books() -> tuple[float, ...]:
            got = client.count()
            return (time.monotonic(), _val(cam_count), _val(counter) if counter else got,
                    _val(dropped) if dropped else 0.0, cpu_s(server_pid), got)

        client.recording = True
        time.sleep(args.seconds)
        client.recording = False
        lat = client.lat[1:]
        sustained, steps = rate_ramp(args, cam_rate, books, {"pyepics": 0}, f"{size}² {path:6s}")
        return {"size": size, "path": path, "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99),
                "frames": len(lat)}, **_ramp_record(args, sustained, steps, load)}
    finally:
        _stop_all(clients, ctx, procs)


def raw_ratios(runs: list[dict]) -> list[dict]:
    """The filter (pass-through) against raw CA at each size: sustained rate and the client's latency."""
    out = []
    for size in sorted({r["size"] for r in runs}):
        by = {r["path"]: r for r in runs if r["size"] == size}
        raw, filt = by.get("raw"), by.get("filter")
        if not (raw and filt):
            continue

        def ratio(a: float | None, b: float | None) -> float | None:
            return round(a / b, 3) if a and b else None

        drops = sum(s["dropped"] for s in filt["steps"])
        out.append({"size": size, "raw_hz": raw["max_sustained_rate_hz"], "filter_hz": filt["max_sustained_rate_hz"],
                    "rate_ratio": ratio(filt["max_sustained_rate_hz"], raw["max_sustained_rate_hz"]),
                    "raw_latency_ms": raw["latency_ms"], "filter_latency_ms": filt["latency_ms"],
                    "latency_p50_ratio": ratio(filt["latency_ms"]["p50"], raw["latency_ms"]["p50"]),
                    "latency_p99_ratio": ratio(filt["latency_ms"]["p99"], raw["latency_ms"]["p99"]),
                    "filter_dropped_counted": drops,
                    "goal": "rate_ratio >= 0.8 and latency_p50_ratio <= 1.2"})
    return out


def plot_raw(results: dict, path: Path) -> None:
    rows = results["runs"]
    fig, axes, x = _bars(rows, "path", 2, 10)
    axes[0].bar(x, [r["max_sustained_rate_hz"] for r in rows], 0.5, color=["C0" if r["path"] == "raw" else "C1"
                                                                          for r in rows])
    axes[0].set_ylabel("max sustained camera rate (Hz)")
    axes[1].bar(x - 0.2, [r["latency_ms"]["p50"] or 0 for r in rows], 0.4, label="p50")
    axes[1].bar(x + 0.2, [r["latency_ms"]["p99"] or 0 for r in rows], 0.4, label="p99")
    axes[1].set_ylabel("camera timestamp → pyepics callback (ms)")
    axes[1].legend(fontsize=7)
    engine = f" {results['engine_args']}" if results.get("engine_args") else ""
    _save(fig, f"raw CA (camera → pyepics) vs the filter IOC with the pass-through engine{engine} (camera → IOC → "
               f"pyepics) on {results['device']}, load {results['loadavg_start']}", path)


def _sweep(args: argparse.Namespace, eb: object, results: dict, variants: list[str],
           run: Callable[..., dict], label: str) -> None:
    """Each size with each variant (``run(size, variant, store, ref, args, log_dir)``), appended to ``results``."""
    with tempfile.TemporaryDirectory() as tmp:
        store, ref, _ = eb.resolve_model(args.models, args.model, Path(tmp))  # type: ignore[attr-defined]
        for size in (int(s) for s in args.sizes.split(",")):
            for variant in variants:
                log_dir = Path(tmp) / f"{size}-{variant}"
                log_dir.mkdir()
                print(f"{size}x{size} uint16, {label}{variant} ...", flush=True)
                r = run(size, variant, store, ref, args, log_dir)
                results["runs"].append(r)
                print(f"  latency {r['latency_ms']}; max sustained {r['max_sustained_rate_hz']} Hz", flush=True)


def _write(results: dict, t0: float, json_path: Path, plot_fn: Callable[[dict, Path], None]) -> int:
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.monotonic() - t0, 1)
    for row in results["ratios"]:
        print(row, flush=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot_fn(results, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


def _header(args: argparse.Namespace, device: str, **extra: object) -> dict:
    return {"device": device, "engine": "passthrough", "camera": "cdae sim-camera over CA, UInt16 12-bit", **extra,
            "cpu_count": os.cpu_count(), "cpu_id": cpu_id(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": args.seconds, "step_seconds": args.step_seconds, "runs": []}


def main_raw(args: argparse.Namespace, eb: object, out: Path, device: str) -> int:
    t0 = time.monotonic()
    results = _header(args, device, client="pyepics in this process, auto_monitor, form=time",
                      engine_args=args.engine_args, ioc_args=args.ioc_args)
    _sweep(args, eb, results, ["raw", "filter"], run_raw, "")
    results["ratios"] = raw_ratios(results["runs"])
    tag = f"-{args.tag}" if args.tag else ""
    return _write(results, t0, out / f"pipeline-raw{tag}-{device}.json", plot_raw)


def output_ratios(runs: list[dict]) -> list[dict]:
    """Each output against CA only at the same size: sustained rate, latency (each client) and IOC CPU per frame;
    the CPU per frame compared at the highest camera rate every output sustained."""
    out = []
    for size in sorted({r["size"] for r in runs}):
        by = {r["output"]: r for r in runs if r["size"] == size}
        ca = by.get("ca")
        if ca is None:
            continue
        common = [s["rate_hz"] for s in ca["steps"] if s["sustained"]
                  and all(any(t["rate_hz"] == s["rate_hz"] and t["sustained"] for t in r["steps"]) for r in by.values())]
        ref_rate = max(common) if common else None

        def cpu_at(r: dict) -> float | None:
            return next((s["ioc_cpu_ms_per_frame"] for s in r["steps"] if s["rate_hz"] == ref_rate), None)

        def ratio(a: float | None, b: float | None) -> float | None:
            return round(a / b, 3) if a and b else None

        for name, r in by.items():
            row: dict = {"size": size, "output": name, "max_sustained_rate_hz": r["max_sustained_rate_hz"],
                         "fps_ratio_vs_ca": ratio(r["max_sustained_rate_hz"], ca["max_sustained_rate_hz"]),
                         "cpu_reference_rate_hz": ref_rate, "ioc_cpu_ms_per_frame": cpu_at(r),
                         "cpu_ratio_vs_ca": ratio(cpu_at(r), cpu_at(ca)),
                         "mb_per_s_sustained": round(r["max_sustained_rate_hz"] * size * size * 2 / 1e6, 1)}
            for kind, lat in r["latency_ms"].items():
                row[f"latency_{kind}_ms"] = {"p50": lat["p50"], "p99": lat["p99"]}
                row[f"latency_{kind}_p50_ratio_vs_ca"] = ratio(lat["p50"], ca["latency_ms"]["ca"]["p50"])
                row[f"latency_{kind}_p99_ratio_vs_ca"] = ratio(lat["p99"], ca["latency_ms"]["ca"]["p99"])
            out.append(row)
    return out


def _bars(rows: list[dict], label: str, columns: int, width: float) -> tuple[object, object, np.ndarray]:
    """A row of bar charts, one bar group per run (labelled by its size and ``label``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, columns)
    x = np.arange(len(rows))
    for ax in axes:
        ax.set_xticks(x, [f"{r['size']}²\n{r[label]}" for r in rows], fontsize=7)
    return fig, axes, x


def _save(fig: object, title: str, path: Path) -> None:
    fig.suptitle(title, fontsize=9)  # type: ignore[attr-defined]
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]


def plot_outputs(results: dict, path: Path) -> None:
    rows = results["ratios"]
    fig, axes, x = _bars(rows, "output", 3, 12)
    axes[0].bar(x, [r["max_sustained_rate_hz"] for r in rows], 0.5)
    axes[0].set_ylabel("max sustained camera rate, no drops (Hz)")
    for i, (kind, shift) in enumerate((("ca", -0.2), ("pva", 0.2))):
        lat = [(r.get(f"latency_{kind}_ms") or {}) for r in rows]
        axes[1].bar(x + shift, [v.get("p50") or 0 for v in lat], 0.4, label=f"{kind} client p50", color=f"C{i}")
        axes[1].scatter(x + shift, [v.get("p99") or np.nan for v in lat], marker="_", s=200, color="k",
                        label="p99" if i == 0 else None)
    axes[1].set_ylabel("raw timestamp → received (ms)")
    axes[1].legend(fontsize=7)
    axes[2].bar(x, [r["ioc_cpu_ms_per_frame"] or 0 for r in rows], 0.5)
    axes[2].set_ylabel("IOC CPU per frame (ms)")
    axes[2].set_title("at the highest rate every output sustained", fontsize=8)
    _save(fig, f"cdae filter IOC outputs on {results['device']}: CA only, PVA only, both (pass-through engine, "
               f"camera over CA; load {results['loadavg_start']})", path)


def plot(results: dict, path: Path) -> None:
    rows = results["runs"]
    fig, axes, x = _bars(rows, "backend", 2, 10)
    axes[0].bar(x - 0.2, [r["latency_ms"]["p50"] or 0 for r in rows], 0.4, label="p50")
    axes[0].bar(x + 0.2, [r["latency_ms"]["p99"] or 0 for r in rows], 0.4, label="p99")
    axes[0].set_ylabel("raw timestamp → denoised received (ms)")
    axes[1].bar(x, [r["max_sustained_rate_hz"] for r in rows], 0.5)
    axes[1].set_ylabel("max sustained camera rate, no drops (Hz)")
    axes[0].legend(fontsize=7)
    _save(fig, f"cdae pipeline on {results['device']} — model {results['model']} ({results['model_note']})", path)


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
    p.add_argument("--refine", type=int, default=2, help="geometric midpoints tried between the last sustained "
                   "rate step and the first that was not")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--outputs", help="compare the outputs instead (pass-through engine): e.g. ca,pva,both")
    p.add_argument("--engine-args", default="", help="more arguments for every engine started, e.g. --no-guard "
                   "(the pass-through engine without the guard: normalisation, copies and the protocol only)")
    p.add_argument("--ioc-args", default="", help="more arguments for every filter IOC started, e.g. "
                   "--queue-size=4")
    p.add_argument("--tag", default="", help="--raw: written as pipeline-raw-TAG-<device>.json (e.g. noguard)")
    p.add_argument("--raw", action="store_true", help="compare the filter IOC (pass-through engine) with raw CA "
                   "instead: a pyepics client on the camera, then on the filter IOC")
    args = p.parse_args(argv)
    eb = _engine_bench()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = eb.device_name()  # type: ignore[attr-defined]
    if args.outputs:
        return main_outputs(args, eb, out, device)
    if args.raw:
        return main_raw(args, eb, out, device)
    with tempfile.TemporaryDirectory() as tmp:
        store, ref, note = eb.resolve_model(args.models, args.model, Path(tmp))  # type: ignore[attr-defined]
        results: dict = {"device": device, "model": ref, "model_note": note, "cpu_count": os.cpu_count(),
                         "cpu_id": cpu_id(),
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


ANCHOR = {"what": "pvapy's own streaming framework, one consumer on loopback", "frames_per_s": 170,
          "frame": "4096x4096 uint8", "mb_per_s": 2850}


def main_outputs(args: argparse.Namespace, eb: object, out: Path, device: str) -> int:
    outputs = [o for o in args.outputs.split(",") if o]
    unknown = set(outputs) - set(OUTPUTS)
    if unknown or "ca" not in outputs:
        raise SystemExit(f"--outputs: expected ca and any of {', '.join(OUTPUTS)}, got {args.outputs}")
    t0 = time.monotonic()
    results = _header(args, device, clients="in this process: caproto threading client (CA), p4p thread client (PVA)",
                      load_note="a shared 2-core machine: other developers' tests and a training job ran beside it",
                      anchor=ANCHOR)
    _sweep(args, eb, results, outputs, run_outputs, "pass-through, output ")
    results["ratios"] = output_ratios(results["runs"])
    best = max(results["ratios"], key=lambda r: r["mb_per_s_sustained"])
    results["anchor"]["best_here_mb_per_s"] = best["mb_per_s_sustained"]
    results["anchor"]["best_here"] = f"{best['size']}² {best['output']}"
    results["anchor"]["ratio_best_here_vs_anchor"] = round(best["mb_per_s_sustained"] / ANCHOR["mb_per_s"], 4)
    return _write(results, t0, out / f"pipeline-pva-{device}.json", plot_outputs)


if __name__ == "__main__":
    sys.exit(main())
