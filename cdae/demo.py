"""``cdae compare`` (offline) and ``cdae demo`` (live): the model on simulated damaged camera frames.

``cdae compare`` simulates frames the model never saw (held-out seed), denoises them in-process,
prints what changed and how each method scores, and writes raw / denoised / residual /
defect-map pictures.

``cdae demo`` runs the real thing on loopback: the simulated camera IOC, the engine and the
filter IOC as child processes with a CA environment of their own (ports nobody else uses,
searches only to 127.0.0.1), prints the PVs to watch and a live status line, writes a
raw / denoised / residual PNG snapshot, and stops everything on Ctrl-C (or after ``--seconds``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cdae.children import ChildProcess, free_port
from cdae.engine.kinds import BackendKind


def run_compare(out_dir: Path | str = "demo-out", model: str | None = None, models_dir: Path | None = None,
             frames: int = 6, size: tuple[int, int] = (512, 512), seed: int = 4242) -> dict[str, float]:
    """Denoise ``frames`` simulated frames; returns mean PSNR (dB) per method."""
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry, default_models_dir
    from cdae.training.baselines import make_baseline
    from cdae.training.dataset import simulated_frames
    from cdae.training.config import DataConfig
    from cdae.training.metrics import frame_metrics
    from cdae.training.report import save_panels

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(models_dir or default_models_dir())
    den = Denoiser.from_package(registry.resolve(model or DEFAULT_MODEL))
    print(f"model {den.manifest.ref}: {den.manifest.parameters} parameters, trained with seed "
          f"{den.manifest.seed}, generator {den.manifest.data_generator_version}")
    data = DataConfig()
    test = simulated_frames(data, seed, 0, frames, [size])
    baselines = {n: make_baseline(n) for n in ("median3", "median5", "gaussian1.0")}
    scores: dict[str, list[float]] = {"noisy": [], "cdae": [], **{n: [] for n in baselines}}
    rows, titles = [], []
    for i, fr in enumerate(test):
        dtype = np.uint8 if fr.bit_depth == 8 else np.uint16
        raw = fr.noisy.astype(dtype)
        t0 = time.perf_counter()
        res = den(raw, bit_depth=fr.bit_depth)
        ms = 1000 * (time.perf_counter() - t0)
        est = res.denoised.astype(np.float32)
        m = frame_metrics(est, fr.clean, fr.defect_mask, fr.adc_max)
        scores["noisy"].append(frame_metrics(fr.noisy, fr.clean, fr.defect_mask, fr.adc_max).psnr_db)
        scores["cdae"].append(m.psnr_db)
        line = [f"frame {i}: {fr.kind:10s} {fr.bit_depth:2d}-bit {size[1]}x{size[0]}",
                f"noisy {scores['noisy'][-1]:5.1f} dB", f"cdae {m.psnr_db:5.1f} dB ({ms:.0f} ms)"]
        for name, b in baselines.items():
            scores[name].append(frame_metrics(b(fr.noisy, fr.adc_max), fr.clean, fr.defect_mask, fr.adc_max).psnr_db)
            line.append(f"{name} {scores[name][-1]:5.1f}")
        flagged = int((res.defect_probability > 0.5).sum())
        line.append(f"defects flagged {flagged} (true {int((fr.defect_mask != 0).sum())})")
        print("  ".join(line))
        if i < 3:
            rows.append({"noisy": fr.noisy, "model": est, "defect map": res.defect_probability, "clean": fr.clean,
                         "median3": baselines["median3"](fr.noisy, fr.adc_max)})
            titles.append(f"{fr.kind}, {fr.bit_depth}-bit")
    path = save_panels(out_dir / "demo.png", rows, row_titles=titles,
                       title=f"{den.manifest.ref}: raw / denoised / residual / defect map / clean / median3")
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    print("mean PSNR: " + ", ".join(f"{k} {v:.2f} dB" for k, v in means.items()))
    print(f"wrote {path}")
    return means


# --- cdae demo: the live pipeline ------------------------------------------------------------------

class DemoConfig(BaseModel):
    """The live demo; ``cdae demo`` flags are a thin layer over it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    output: Path = Field(Path("demo-out"), description="folder for the PNG snapshot")
    model: str | None = Field(None, description="NAME[:VERSION]; default: the engine's (cdae-default)")
    models_dir: Path | None = None
    size: str = Field("512x512", pattern=r"^\d+x\d+$", description="camera WxH")
    rate: float = Field(5.0, gt=0, le=1000, description="camera frames per second")
    data_type: Literal["UInt8", "UInt16", "Float32"] = "UInt16"
    bit_depth: int = Field(12, description="camera ADC bits of UInt16/Float32 frames")
    backend: BackendKind = "auto"
    prefix: str = Field("13SIM1:", description="camera at PREFIX image1:, filter at PREFIX CDAE1:")
    seconds: float | None = Field(None, gt=0, description="run this long, then summarise and exit")


def _cdae(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdae.cli", *args]


def run_live_demo(config: DemoConfig) -> int:
    """Camera → engine → filter IOC on loopback until Ctrl-C or ``config.seconds``; returns an exit status."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    cam_port, ioc_port, repeater = free_port(), free_port(), free_port()
    ca_env = {
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": f"127.0.0.1:{cam_port} 127.0.0.1:{ioc_port}",
        "EPICS_CA_REPEATER_PORT": str(repeater),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_MAX_ARRAY_BYTES": str(256 * 1024 * 1024),
    }
    os.environ.update(ca_env)  # this process reads the PVs too
    base = {**os.environ, **ca_env, "PYTHONUNBUFFERED": "1"}
    cam_prefix, ioc_prefix = config.prefix + "image1:", config.prefix + "CDAE1:"
    w, h = config.size.split("x")
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    children: list[ChildProcess] = []
    try:
        engine_args = ["engine", "--bind", "tcp://127.0.0.1:0", "--backend", config.backend]
        if config.model:
            engine_args += ["--model", config.model]
        if config.models_dir:
            engine_args += ["--models", str(config.models_dir)]
        print("starting the engine (loading the model)...", flush=True)
        eng = ChildProcess("engine", _cdae(*engine_args), base, r"^cdae-engine ready ", out / "engine.log")
        children.append(eng)
        eng.wait_ready(600)
        m = re.search(r"data=(\S+) control=(\S+) backend=(\S+) .*model=(\S+)", eng.ready_line)
        assert m is not None
        data_ep, control_ep, backend, model = m.groups()
        print(f"engine: {model} on {backend} at {data_ep}", flush=True)
        cam = ChildProcess("camera", _cdae("sim-camera", "--prefix", cam_prefix, "--size", config.size, "--rate",
                                     str(config.rate), "--data-type", config.data_type,
                                     *(["--bit-depth", str(config.bit_depth)] if config.bit_depth in (12, 16) else [])),
                     {**base, "EPICS_CA_SERVER_PORT": str(cam_port), "EPICS_CAS_SERVER_PORT": str(cam_port)},
                     r"^cdae-sim-camera ready ", out / "camera.log")
        children.append(cam)
        cam.wait_ready(300)
        bit_depth = 8 if config.data_type == "UInt8" else config.bit_depth
        ioc = ChildProcess("ioc", _cdae("ioc", "--source", cam_prefix, "--prefix", ioc_prefix, "--engine", data_ep,
                                  "--control", control_ep, "--bit-depth", str(bit_depth)),
                     {**base, "EPICS_CA_SERVER_PORT": str(ioc_port), "EPICS_CAS_SERVER_PORT": str(ioc_port)},
                     r"^cdae-ioc ready ", out / "ioc.log")
        children.append(ioc)
        ioc.wait_ready(120)
        print(f"""
PVs (Channel Access on 127.0.0.1 only; in another shell first:
  export EPICS_CA_AUTO_ADDR_LIST=NO EPICS_CA_ADDR_LIST="{ca_env['EPICS_CA_ADDR_LIST']}" \\
         EPICS_CA_MAX_ARRAY_BYTES={ca_env['EPICS_CA_MAX_ARRAY_BYTES']})
  raw camera     {cam_prefix}ArrayData        ({w}x{h} {config.data_type}, {cam_prefix}UniqueId_RBV)
  clean truth    {cam_prefix}Clean:ArrayData
  denoised       {ioc_prefix}ArrayData        (same UniqueId and timestamp as the raw frame)
  what removed   {ioc_prefix}Residual:ArrayData, {ioc_prefix}DefectMap:ArrayData
  status         {ioc_prefix}Latency_RBV {ioc_prefix}DroppedArrays_RBV {ioc_prefix}Model_RBV {ioc_prefix}EngineConnected_RBV
  swap model     caput {ioc_prefix}Model NAME:VERSION      (list: {ioc_prefix}Models_RBV)
logs in {out}/; Ctrl-C stops everything.
""", flush=True)
        return _watch(cam_prefix, ioc_prefix, out, config, stop)
    finally:
        for c in reversed(children):
            c.stop()
        signal.signal(signal.SIGINT, previous)
        print("stopped the filter IOC, the camera and the engine", flush=True)


def _watch(cam_prefix: str, ioc_prefix: str, out: Path, config: DemoConfig, stop: threading.Event) -> int:
    from caproto.threading.client import Context

    ctx = Context(timeout=5.0)
    names = {k: cam_prefix + k for k in ("ArrayCounter_RBV",)}
    names.update({f"ioc:{k}": ioc_prefix + k for k in ("ArrayCounter_RBV", "Latency_RBV", "DroppedArrays_RBV",
                                                       "Model_RBV", "EngineConnected_RBV", "ExecutionTime_RBV")})
    pvs = dict(zip(names, ctx.get_pvs(*names.values(), timeout=5.0)))

    def read(key: str) -> object:
        v = pvs[key].read(timeout=5.0).data[0]
        return v.decode() if isinstance(v, bytes) else v

    started = time.monotonic()
    deadline = started + config.seconds if config.seconds else None
    tty = sys.stdout.isatty()
    first: tuple[int, int] | None = None
    prev = None
    latencies: list[float] = []
    snapshot_done = False
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(1.0)
            try:
                n_in, n_out = int(read("ArrayCounter_RBV")), int(read("ioc:ArrayCounter_RBV"))  # type: ignore[arg-type]
                latency, drops = float(read("ioc:Latency_RBV")), int(read("ioc:DroppedArrays_RBV"))  # type: ignore[arg-type]
                model, engine_up = str(read("ioc:Model_RBV")), int(read("ioc:EngineConnected_RBV"))  # type: ignore[arg-type]
            except Exception as e:  # a slow moment: report and keep going
                print(f"(status read failed: {e})", flush=True)
                continue
            now = time.monotonic()
            if first is None:
                first = (n_in, n_out)
            if prev is not None:
                dt = now - prev[0]
                rate_in, rate_out = (n_in - prev[1]) / dt, (n_out - prev[2]) / dt
                if n_out > prev[2]:
                    latencies.append(latency)
                line = (f"in {rate_in:5.1f}/s  out {rate_out:5.1f}/s  latency {latency:7.1f} ms  drops {drops:5d}  "
                        f"model {model or '-'}  engine {'up' if engine_up else 'DOWN'}")
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            prev = (now, n_in, n_out)
            if not snapshot_done and n_out >= 2:
                snapshot_done = _snapshot(ctx, cam_prefix, ioc_prefix, out / "demo-live.png")
        if tty:
            print()
        if first is None or prev is None:
            print("no status could be read")
            return 1
        span = max(prev[0] - started, 1e-9)
        frames_out = prev[2] - first[1]
        p50 = float(np.percentile(latencies, 50)) if latencies else float("nan")
        print(f"summary: {prev[1]} frames in, {prev[2]} frames out ({frames_out / span:.1f}/s over {span:.0f} s), "
              f"latency p50 {p50:.1f} ms, drops {drops}, model {model}")
        if not snapshot_done:
            snapshot_done = _snapshot(ctx, cam_prefix, ioc_prefix, out / "demo-live.png")
        return 0 if prev[2] > 0 else 1
    finally:
        ctx.disconnect()


def _snapshot(ctx: object, cam_prefix: str, ioc_prefix: str, path: Path) -> bool:
    """raw / denoised / residual (+ clean when the camera's truth is of the same frame) as one PNG."""
    from cdae.ioc.frames import NDDataType, frame_from_ca
    from cdae.training.report import save_panels

    keys = ["ArrayData", "UniqueId_RBV", "ArraySize0_RBV", "ArraySize1_RBV", "DataType_RBV", "Residual:ArrayData"]
    try:
        pvs = ctx.get_pvs(*(ioc_prefix + k for k in keys), cam_prefix + "Clean:ArrayData",  # type: ignore[attr-defined]
                          cam_prefix + "Clean:UniqueId_RBV", timeout=5.0)
        vals = [pv.read(timeout=10.0).data for pv in pvs]
    except Exception as e:
        print(f"(snapshot failed: {e})", flush=True)
        return False
    den_raw, uid, w, h, dtype, res_raw, clean_raw, clean_uid = vals
    w, h = int(w[0]), int(h[0])
    den = frame_from_ca(den_raw, w, h, NDDataType(int(dtype[0]))).astype(np.float32)
    residual = frame_from_ca(res_raw, w, h, NDDataType.Float32)
    row = {"noisy": den + residual, "model": den}  # raw = denoised + residual, exactly, for this UniqueId
    if int(clean_uid[0]) == int(uid[0]):
        row["clean"] = frame_from_ca(clean_raw, w, h, NDDataType.Float32)
    save_panels(path, [row], row_titles=[f"UniqueId {int(uid[0])}"], title="live: raw / denoised / residual")
    print(f"\nwrote {path}", flush=True)
    return True
