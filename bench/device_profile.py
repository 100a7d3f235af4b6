"""Where the device path's time goes on a GPU: each stage timed alone (a device sync around it), the torch
profiler's table of one steady frame (CPU-side dispatch against GPU kernel time), and the host's share.

    python bench/device_profile.py --size 1024 --out /tmp/cdae-gpu     # writes device-profile-<gpu>.json

The shipped model (or a random-weight stand-in) on torch-cuda with ``device_pre_post`` and the engine's
guard (the package's calibrated threshold), on a simulated 16-bit frame with every defect class.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device-statistics", action="store_true", help="offset, scale, full well and noise model on "
                   "the GPU (backend_options.host_statistics = false)")
    p.add_argument("--guard-graphs", action="store_true", help="the guard replayed as a CUDA graph")
    p.add_argument("--device", default="cuda", help="cuda; cpu: a dry run of this script (torch-cpu on the device path)")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    import tempfile

    from engine import resolve_model  # bench/engine.py's: the shipped model, else a stand-in

    from cdae.engine import device_frame as D
    from cdae.engine.backends import load_backend
    from cdae.engine.config import BackendOptions
    from cdae.engine.guard import GuardConfig, for_package
    from cdae.engine.package import ModelRegistry
    from cdae.engine.pipeline import denoise_frame
    from cdae.training.defects import DefectConfig, simulate_frame
    from cdae.training.simulate import SceneConfig

    cuda = args.device != "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tmp = Path(tempfile.mkdtemp())
    store, ref, note = resolve_model(None, None, tmp)
    pkg = ModelRegistry(store).resolve(ref)
    pkg = getattr(pkg, "path", pkg)
    if cuda:
        backend = load_backend("torch-cuda", pkg, BackendOptions(device="cuda", precision=args.precision,
                                                                  host_statistics=not args.device_statistics,
                                                                  guard_graphs=args.guard_graphs))
    else:
        backend = load_backend("torch-cpu", pkg, BackendOptions(precision="fp32"))
        backend.frame_on_device = True
        backend.host_statistics = not args.device_statistics  # type: ignore[attr-defined]
    gc = for_package(GuardConfig(), pkg)
    _, det = simulate_frame(41, 5, args.size, args.size, 16, SceneConfig(), DefectConfig.all_defects())
    frame = np.clip(np.rint(det.noisy), 0, 65535).astype(np.uint16)
    run = functools.partial(denoise_frame, frame, backend, bit_depth=16, guard_config=gc)
    for _ in range(5):
        run()
    sync()
    walls = []
    for _ in range(args.frames):
        t0 = time.perf_counter()
        run()
        walls.append((time.perf_counter() - t0) * 1e3)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    result: dict[str, object] = {"gpu": gpu, "torch": torch.__version__, "model": ref,
                                 "note": note, "size": args.size, "backend": backend.describe(),
                                 "threshold": gc.defect_threshold, "frame_ms_p50": float(np.median(walls))}
    print("frame p50", result["frame_ms_p50"], "ms", backend.describe(), flush=True)
    # the profiler: one steady frame, CPU-side (dispatch) and GPU kernels
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(3):
            run()
        sync()
    ka = prof.key_averages()
    table_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=30)
    table_gpu = ka.table(sort_by="self_device_time_total", row_limit=20)
    print(table_cpu)
    print(table_gpu)
    gpu_us = sum(e.self_device_time_total for e in ka) / 3
    cpu_ops = sum(e.count for e in ka if e.key.startswith("aten::")) / 3
    result.update({"gpu_kernel_ms_per_frame": gpu_us / 1e3, "aten_calls_per_frame": cpu_ops,
                   "syncs_per_frame": sum(e.count for e in ka if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                                            "cudaMemcpyAsync", "aten::_local_scalar_dense")) / 3,
                   "table_cpu": table_cpu, "table_gpu": table_gpu})
    # each stage alone: a sync before and after
    stages = defaultdict(list)
    names = ["frame_statistics", "host_noise_model", "network_input_given", "network_input", "frame_offset_scale",
             "detect_full_well", "measure_noise", "guard_core", "find_impulses", "impulse_evidence", "guard",
             "run_tiled", "camera_values"]
    if args.guard_graphs:  # a sync inside a graph's replayed stages would break nothing, but is not what runs
        names.remove("find_impulses"), names.remove("impulse_evidence")
    originals = {n: getattr(D, n) for n in names}

    def timed(n):  # noqa: ANN001, ANN202
        fn = originals[n]

        def w(*a, **k):  # noqa: ANN002, ANN003, ANN202
            sync()
            t0 = time.perf_counter()
            r = fn(*a, **k)
            sync()
            stages[n].append((time.perf_counter() - t0) * 1e3)
            return r
        return w

    for n in names:
        setattr(D, n, timed(n))
    up, down = D.FrameStaging.upload, D.FrameStaging.download
    for n, fn in (("upload", up), ("download", down)):
        def w(self, *a, _fn=fn, _n=n, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            sync()
            t0 = time.perf_counter()
            r = _fn(self, *a, **k)
            sync()
            stages[_n].append((time.perf_counter() - t0) * 1e3)
            return r
        setattr(D.FrameStaging, n, w)
    for _ in range(10):
        run()
    result["stages_ms_p50"] = {k: round(float(np.median(v)), 3) for k, v in stages.items()}
    result["backend_after"] = backend.describe()
    for k, v in result["stages_ms_p50"].items():
        print(f"{k:20s} {v:8.3f} ms")
    # the host's small NumPy steps the device path shares (the noise model's line fit)
    from cdae.engine.guard import fit_variance

    x = np.linspace(0, 3000, 16)
    t0 = time.perf_counter()
    for _ in range(50):
        fit_variance(x, 2 + 0.5 * x, np.full(16, 4000.0))
    result["host_fit_variance_ms"] = (time.perf_counter() - t0) * 1e3 / 50
    print("host fit_variance", result["host_fit_variance_ms"], "ms")
    name = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    variant = ("-device-stats" if args.device_statistics else "") + ("-guard-graphs" if args.guard_graphs else "")
    result["variant"] = variant.strip("-") or "default"
    out = Path(args.out) / f"device-profile-{name}-{args.size}{variant}.json"
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
