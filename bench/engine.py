"""Engine benchmark: frames/s and latency per backend and frame size, beside a pass-through engine.

Each backend runs as a real ``cdae engine`` process on loopback, fed uint16 frames through the
full protocol path by the synchronous client. The ``passthrough`` engine (identity network,
same decode → normalise → denormalise → encode path) is measured in the same run, so that
protocol + pipeline overhead and model cost can be told apart.

Per backend and size:
- latency p50/p99 (ms): one frame at a time, client send → reply decoded;
- frames/s: ``--window`` frames in flight (pipelined), the engine's queue as deep as the window;
- the engine's own inference_ms and total_ms (p50), from the reply headers.

    python bench/engine.py                            # all backends available here, 256²…2048²
    python bench/engine.py --sizes 256 --frames 20    # smoke check
    python bench/engine.py --backends torch-cuda,torch-cuda+host --sizes 1024,2048   # device vs host pre/post
    python bench/engine.py --backends torch-cpu@bf16,torch-cpu@bf16+module --sizes 512,1024  # fused vs autocast

Writes ``bench/results/engine-<device>.json`` and ``engine-<device>.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cdae.children import ChildProcess
from cdae.training.environment import cpu_id

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"^cdae-engine ready data=(?P<data>\S+) control=(?P<control>\S+)")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"cpu-{os.cpu_count()}c-{name}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def resolve_model(models: str | None, model: str | None, tmp: Path) -> tuple[Path, str, str]:
    """(store, ref, note): the requested model, else the shipped default, else a random-weight stand-in."""
    from cdae.engine.package import DEFAULT_MODEL, ModelPackageError, ModelRegistry, default_models_dir

    store = Path(models) if models else default_models_dir()
    ref = model or DEFAULT_MODEL
    try:
        ModelRegistry(store).resolve(ref)
        return store, ref, "trained package"
    except ModelPackageError:
        if model:
            raise
    # same architecture as the shipped default, random weights: the cost of running it is identical
    import torch

    from cdae.engine.architecture import build_model
    from cdae.training.config import load_train_config

    arch = load_train_config(ROOT / "training" / "configs" / "cdae-default.toml").architecture
    torch.manual_seed(0)
    store = tmp / "models"
    from cdae.engine.package import write_package

    write_package(store, name="bench", version="1", state_dict=build_model(arch).state_dict(), architecture=arch)
    return store, "bench:1", f"random weights, default architecture ({DEFAULT_MODEL} not found in {store})"


class Engine(ChildProcess):
    """One ``cdae engine`` process, started and waited for by its ready line."""

    def __init__(self, spec: str, store: Path, ref: str, args: argparse.Namespace, log_dir: Path) -> None:
        base, _, variant = spec.partition("+")
        backend, _, precision = base.partition("@")
        if variant not in ("", "host", "module", "guard-graphs", "device-stats"):
            raise SystemExit(f"bench/engine.py: unknown variant +{variant} in {spec!r} (known: +host, +module, "
                             "+guard-graphs, +device-stats)")
        cmd = [sys.executable, "-m", "cdae.cli", "engine", "--bind", "tcp://127.0.0.1:0", "--models", str(store),
               "--model", ref, "--backend", backend, "--queue", str(max(2, args.window)),
               "--max-pixels", str(max(s for s in args.sizes) ** 2)]
        if precision:
            cmd += ["--precision", precision]
        if variant == "host":  # torch-cuda with the pre/post-processing on the host (NumPy), as before device_frame
            cmd += ["--no-device-pre-post"]
        if variant == "device-stats":  # torch-cuda on the device path with its statistics read on the GPU too
            cmd += ["--device-statistics"]
        if variant == "guard-graphs":  # torch-cuda on the device path with the guard replayed as a CUDA graph
            cmd += ["--guard-graphs"]
        if variant == "module":  # torch-cpu in BF16 as the module under autocast, not the fused oneDNN plan
            cmd += ["--cpu-kernels", "module"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        name = spec.replace("@", "-")
        super().__init__(f"engine-{name}", cmd, {**os.environ}, READY.pattern, log_dir / f"engine-{name}.log")
        self.wait_ready(args.start_timeout)
        m = READY.match(self.ready_line)
        assert m is not None
        self.data, self.control = m["data"], m["control"]


def _pct(values: list[float], p: float) -> float:
    return round(float(np.percentile(values, p)), 3) if values else float("nan")


def measure(engine: Engine, size: int, frames: int, window: int) -> dict[str, object]:
    from cdae.engine.client import EngineClient
    from cdae.engine.pipeline import synthetic_frame

    frame = synthetic_frame((size, size), "uint16", seed=size)
    with EngineClient(engine.data, window=1, timeout_s=600) as c:
        for _ in range(3):  # warm-up: allocator, autotuning, CUDA graph capture for this shape
            r = c.denoise(frame)
            if not r.ok:
                raise RuntimeError(f"engine error at {size}²: {r.header.error}")
        lat, inf, tot = [], [], []
        for _ in range(frames):
            t0 = time.perf_counter()
            r = c.denoise(frame)
            lat.append((time.perf_counter() - t0) * 1e3)
            inf.append(r.header.timings.inference_ms)
            tot.append(r.header.timings.total_ms)
    with EngineClient(engine.data, window=window, timeout_s=600) as c:
        sent: dict[int, float] = {}
        plat: list[float] = []
        errors = 0
        t0 = time.perf_counter()
        for _ in range(frames):
            sent[c.submit(frame)] = time.perf_counter()
            while c.in_flight >= window:
                r = c.receive()
                plat.append((time.perf_counter() - sent[r.frame_id]) * 1e3)  # type: ignore[index]
                errors += not r.ok
        while c.in_flight:
            r = c.receive()
            plat.append((time.perf_counter() - sent[r.frame_id]) * 1e3)  # type: ignore[index]
            errors += not r.ok
        elapsed = time.perf_counter() - t0
    return {
        "size": size, "frames": frames, "dtype": "uint16",
        "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99)},
        "engine_inference_ms_p50": _pct(inf, 50), "engine_total_ms_p50": _pct(tot, 50),
        "transport_ms_p50": round(_pct(lat, 50) - _pct(tot, 50), 3),
        "pipelined": {"window": window, "frames_per_s": round(frames / elapsed, 2),
                      "latency_ms": {"p50": _pct(plat, 50), "p99": _pct(plat, 99)}, "errors": errors},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (backend, rows) in enumerate(results["backends"].items()):
        sizes = [r["size"] for r in rows]
        style = dict(linestyle="--" if backend == "passthrough" else "-", color=f"C{i}")
        ax1.plot(sizes, [r["pipelined"]["frames_per_s"] for r in rows], marker="o", label=backend, **style)
        ax2.plot(sizes, [r["latency_ms"]["p50"] for r in rows], marker="o", label=f"{backend} p50", **style)
        ax2.plot(sizes, [r["latency_ms"]["p99"] for r in rows], marker="x", alpha=0.5, label=f"{backend} p99",
                 **style)
    for ax, title, unit in ((ax1, "throughput", "frames/s"), (ax2, "latency (one frame at a time)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frame side (uint16, square)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"cdae engine on {results['device']} — model {results['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _variant_ratios(results: dict, suffix: str, key: str, engine_ms: str) -> None:
    """Each plain backend's rows against its ``suffix`` variant's (same run, same sizes), as ``key``."""
    for backend, rows in results["backends"].items():
        variant = {r["size"]: r for r in results["backends"].get(f"{backend}{suffix}", [])}
        for r in rows:
            v = variant.get(r["size"])
            if v and "+" not in backend:
                r[key] = {"frames_per_s": round(r["pipelined"]["frames_per_s"] / v["pipelined"]["frames_per_s"], 3),
                          "latency_p50": round(r["latency_ms"]["p50"] / v["latency_ms"]["p50"], 3),
                          engine_ms: round(r[engine_ms] / v[engine_ms], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", help="comma list of BACKEND[@PRECISION][+host|+module] (default: every backend "
                   "available here, torch-cpu in fp32 and, where the CPU has native BF16, bf16); +host: torch-cuda "
                   "with its pre/post-processing on the host (--no-device-pre-post), to compare with the device path; "
                   "+module: torch-cpu in bf16 as the module under autocast (--cpu-kernels module); passthrough is "
                   "always added")
    p.add_argument("--sizes", default="256,512,1024,2048", help="square frame sides")
    p.add_argument("--frames", type=int, default=200, help="frames per size and phase")
    p.add_argument("--window", type=int, default=2, help="frames in flight in the throughput phase")
    p.add_argument("--models", help="model store (default: $CDAE_MODELS or models/)")
    p.add_argument("--model", help="NAME[:VERSION] (default: the shipped model, else a random-weight stand-in)")
    p.add_argument("--threads", type=int, help="torch CPU threads in the engine")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--start-timeout", type=float, default=1800.0, help="s; TensorRT builds its plan on first start")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]

    import torch

    from cdae.engine.backends import AUTO_ORDER, cpu_bf16_native, cuda_available, tensorrt_importable
    from cdae.engine.package import code_version

    if args.backends:
        backends = [b for b in args.backends.split(",") if b != "passthrough"]
    else:
        backends = [b for b in AUTO_ORDER if b == "torch-cpu" or cuda_available()
                    and (b != "tensorrt" or tensorrt_importable())]
        cpu = backends.index("torch-cpu")
        backends[cpu:cpu + 1] = ["torch-cpu@fp32", *(["torch-cpu@bf16"] if cpu_bf16_native() else [])]
        if importlib.util.find_spec("onnxruntime") is not None:
            backends.append("onnxruntime")  # the exported graph on the CPU, beside torch-cpu
    backends.append("passthrough")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = device_name()
    with tempfile.TemporaryDirectory() as tmp:
        store, ref, note = resolve_model(args.models, args.model, Path(tmp))
        results: dict = {
            "device": device, "model": ref, "model_note": note, "code_version": code_version(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "cpu_count": os.cpu_count(), "cpu_id": cpu_id(), "threads": args.threads, "backends": {},
        }
        for backend in backends:
            print(f"[{backend}] starting engine", flush=True)
            engine = Engine(backend, store, ref, args, Path(tmp))
            try:
                rows = []
                for size in args.sizes:
                    row = measure(engine, size, args.frames, args.window)
                    rows.append(row)
                    print(f"[{backend}] {size}x{size} uint16: {row['pipelined']['frames_per_s']} frames/s, "  # type: ignore[index]
                          f"latency p50 {row['latency_ms']['p50']} ms p99 {row['latency_ms']['p99']} ms, "  # type: ignore[index]
                          f"engine inference p50 {row['engine_inference_ms_p50']} ms", flush=True)
                results["backends"][backend] = rows
            finally:
                engine.stop()
    for backend, rows in results["backends"].items():
        if backend == "passthrough":
            continue
        base = {r["size"]: r for r in results["backends"]["passthrough"]}
        for r in rows:
            b = base.get(r["size"])
            if b:
                r["model_cost_ms_p50"] = round(r["latency_ms"]["p50"] - b["latency_ms"]["p50"], 3)
    fp32 = {r["size"]: r for r in results["backends"].get("torch-cpu@fp32", [])}
    for backend, rows in results["backends"].items():
        for r in rows:
            ref_row = fp32.get(r["size"])
            if ref_row and backend != "torch-cpu@fp32":
                r["vs_torch_cpu_fp32"] = {
                    "frames_per_s": round(r["pipelined"]["frames_per_s"] / ref_row["pipelined"]["frames_per_s"], 3),
                    "latency_p50": round(r["latency_ms"]["p50"] / ref_row["latency_ms"]["p50"], 3)}
    _variant_ratios(results, "+host", "vs_host_pre_post", "engine_total_ms_p50")  # device path vs host path
    _variant_ratios(results, "+module", "vs_module_autocast", "engine_inference_ms_p50")  # fused BF16 vs autocast
    _variant_ratios(results, "+guard-graphs", "vs_guard_graphs", "engine_total_ms_p50")  # eager guard vs its graph
    _variant_ratios(results, "+device-stats", "vs_device_statistics", "engine_total_ms_p50")  # host vs device stats
    json_path = out / f"engine-{device}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"engine-{device}.png")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
