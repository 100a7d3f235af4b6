"""Triton benchmark: the same model behind cdae's ZeroMQ engine and behind Triton (one and two instances), on the CPU.

The reference is cdae's own engine (``torch-cpu``), measured in the same run; Triton serves the
repository `cdae export --to triton` writes (the frame-path Python-backend model, torch-cpu inside),
started from nvidia-pytriton's bundled server on loopback. Every configuration is driven by the same
asyncio client code path (``AsyncEngineClient`` / ``AsyncTritonClient``), with uint16 square frames:

- latency p50/p99 (ms): one frame at a time;
- frames/s sustained: ``--window`` frames in flight;
- ratios against the ZeroMQ engine at the same size (frames/s: Triton / engine; latency: Triton / engine).

    python bench/triton.py                         # 512² and 1024², 1 and 2 Triton instances
    python bench/triton.py --sizes 256 --frames 5  # smoke check

Writes ``bench/results/triton-<device>.json`` and ``.png``. Torch threads per process or instance:
``--threads`` (default 1), so that two instances on two cores are a fair question; the engine is also
measured with one torch thread per core, what two single-thread Triton instances compete with.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ROOT, Engine, _pct, device_name, resolve_model  # noqa: E402


async def _measure(client: object, size: int, frames: int, window: int) -> dict[str, object]:
    from cdae.engine.pipeline import synthetic_frame

    frame = synthetic_frame((size, size), "uint16", seed=size)
    for _ in range(2):
        r = await client.denoise(frame)  # type: ignore[attr-defined]
        if not r.ok:
            raise RuntimeError(f"error at {size}²: {r.header.error}")
    lat: list[float] = []
    for _ in range(frames):
        t0 = time.perf_counter()
        await client.denoise(frame)  # type: ignore[attr-defined]
        lat.append((time.perf_counter() - t0) * 1e3)
    plat: list[float] = []
    errors = 0
    todo = iter(range(frames))

    async def worker() -> None:
        nonlocal errors
        for _ in todo:
            t = time.perf_counter()
            r = await client.denoise(frame)  # type: ignore[attr-defined]
            plat.append((time.perf_counter() - t) * 1e3)
            errors += not r.ok

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(window)))
    elapsed = time.perf_counter() - t0
    return {"size": size, "frames": frames, "dtype": "uint16", "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99)},
            "pipelined": {"window": window, "frames_per_s": round(frames / elapsed, 3),
                          "latency_ms": {"p50": _pct(plat, 50), "p99": _pct(plat, 99)}, "errors": errors}}


def _run(make: object, sizes: list[int], frames: int, window: int, label: str) -> list[dict[str, object]]:
    async def go() -> list[dict[str, object]]:
        client = make()  # type: ignore[operator]
        try:
            rows = []
            for size in sizes:
                row = await _measure(client, size, frames, window)
                print(f"[{label}] {size}x{size}: {row['pipelined']['frames_per_s']} frames/s, latency p50 "  # type: ignore[index]
                      f"{row['latency_ms']['p50']} ms p99 {row['latency_ms']['p99']} ms", flush=True)  # type: ignore[index]
                rows.append(row)
            return rows
        finally:
            await client.close()

    return asyncio.run(go())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    configs = list(results["configs"])
    sizes = results["sizes"]
    width = 0.8 / len(configs)
    for i, name in enumerate(configs):
        rows = results["configs"][name]
        xs = [j + i * width for j in range(len(sizes))]
        ax1.bar(xs, [r["pipelined"]["frames_per_s"] for r in rows], width, label=name, color=f"C{i}")
        ax2.bar(xs, [r["latency_ms"]["p50"] for r in rows], width, label=f"{name} p50", color=f"C{i}")
        ax2.scatter(xs, [r["latency_ms"]["p99"] for r in rows], color="k", marker="_", s=200, zorder=3)
    for ax, title, unit in ((ax1, f"sustained ({results['window']} in flight)", "frames/s"),
                            (ax2, "latency, one frame at a time (bar p50, tick p99)", "ms")):
        ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(sizes))], [f"{s}²" for s in sizes])
        ax.set_xlabel("uint16 frame")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"cdae engine vs Triton on {results['device']} (shared, no GPU) — {results['model']}, "
                 f"{results['threads']} torch thread(s) each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--frames", type=int, default=12, help="frames per size and phase")
    p.add_argument("--window", type=int, default=2, help="frames in flight in the sustained phase")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", help="model store (default: $CDAE_MODELS or models/)")
    p.add_argument("--model", help="NAME:VERSION with an integer version (default: the shipped model)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--start-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]

    import torch

    from cdae.children import free_port
    from cdae.deploy.triton import InstancePlan, TritonServer, export_repository
    from cdae.engine.client import AsyncEngineClient
    from cdae.engine.config import FramePathSettings
    from cdae.engine.package import ModelRegistry, code_version
    from cdae.engine.triton_client import AsyncTritonClient

    device = device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        store, ref, note = resolve_model(args.models, args.model, Path(tmp))
        pkg = ModelRegistry(store).resolve(ref)
        results: dict = {
            "device": device, "machine_note": "2-core CPU shared with other work, no GPU: numbers are this run's, "
                                              "read the ratios", "model": ref, "model_note": note,
            "code_version": code_version(), "torch": torch.__version__, "python": platform.python_version(),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "sizes": args.sizes, "window": args.window, "threads": args.threads, "reference": "zeromq-engine",
            "configs": {},
        }
        # the reference (``--threads`` torch threads, as each Triton instance), and the engine given every core
        # in torch threads: what two Triton instances of one thread each are up against
        for name, threads in (("zeromq-engine", args.threads), (f"zeromq-engine-{os.cpu_count()}-threads", os.cpu_count())):
            if name != "zeromq-engine" and threads == args.threads:
                continue
            print(f"[{name}] starting", flush=True)
            engine_args = argparse.Namespace(window=args.window, sizes=args.sizes, threads=threads,
                                             start_timeout=args.start_timeout)
            engine = Engine("torch-cpu", store, ref, engine_args, Path(tmp))
            try:
                results["configs"][name] = _run(
                    lambda: AsyncEngineClient(engine.data, window=args.window, timeout_s=600),  # noqa: B023
                    args.sizes, args.frames, args.window, name)
            finally:
                engine.stop()
        settings = FramePathSettings(backend="torch-cpu", threads=args.threads, max_pixels=max(args.sizes) ** 2,
                                     warmup_shape=(args.sizes[0], args.sizes[0]))
        for instances in (1, 2):
            name = f"triton-{instances}-instance" + ("s" if instances > 1 else "")
            repo = Path(tmp) / f"repo{instances}"
            export_repository([pkg], repo, settings=settings, plan=InstancePlan(cpu_instances=instances), onnx=False,
                              tensorrt=False)
            model = pkg.parent.name
            server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                                  load=[model])
            print(f"[{name}] starting tritonserver", flush=True)
            t0 = time.perf_counter()
            server.start(timeout_s=args.start_timeout)
            print(f"[{name}] ready in {time.perf_counter() - t0:.1f} s", flush=True)
            url = f"triton://127.0.0.1:{server.grpc_port}/{model}"
            try:
                results["configs"][name] = _run(lambda: AsyncTritonClient(url, window=args.window, timeout_s=600),
                                                args.sizes, args.frames, args.window, name)
            finally:
                server.close()
    ref_rows = {r["size"]: r for r in results["configs"]["zeromq-engine"]}
    for name, rows in results["configs"].items():
        for r in rows:
            b = ref_rows[r["size"]]
            r["vs_zeromq_engine"] = {
                "frames_per_s": round(r["pipelined"]["frames_per_s"] / b["pipelined"]["frames_per_s"], 3),
                "latency_p50": round(r["latency_ms"]["p50"] / b["latency_ms"]["p50"], 3),
                "latency_p99": round(r["latency_ms"]["p99"] / b["latency_ms"]["p99"], 3)}
    one = {r["size"]: r for r in results["configs"]["triton-1-instance"]}
    results["two_vs_one_instance_frames_per_s"] = {
        str(r["size"]): round(r["pipelined"]["frames_per_s"] / one[r["size"]]["pipelined"]["frames_per_s"], 3)
        for r in results["configs"]["triton-2-instances"]}
    json_path = out / f"triton-{device}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
