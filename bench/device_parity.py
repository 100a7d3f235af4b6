"""Parity of the device path (``cdae.engine.device_frame``) with the NumPy path, on a torch device.

On fixed simulated frames (8, 12 and 16 bits, every defect class: saturated blobs, hot and dead
pixels, bad lines, radiation) it runs the NumPy network input and guard and the torch ones on
``--device``, and reports per frame: pixels whose network input or guard output differ and the
largest difference, flag differences, and whether the full well and noise model agree. With a
CUDA device it also runs the whole frame path through torch-cuda with and without
``device_pre_post`` on a random-weight network (same input, same network: the difference is the
pre/post-processing's alone). On the CPU every count is expected to be 0 (tests/engine/test_device_frame.py).

    python bench/device_parity.py --device cuda --out /tmp/cdae-gpu

Writes ``device-parity-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cdae.engine import device_frame as D
from cdae.engine import guard as G
from cdae.engine import normalise as N
from cdae.training.defects import DefectConfig, simulate_frame
from cdae.training.simulate import SceneConfig

CASES = [(8, (256, 256)), (12, (256, 320)), (16, (512, 512)), (16, (1024, 1024)), (12, (2048, 2048))]


def _frame(index: int, bits: int, shape: tuple[int, int]) -> np.ndarray:
    _, det = simulate_frame(41, index, *shape, bits, SceneConfig(), DefectConfig.all_defects())
    return np.clip(np.rint(det.noisy), 0, 2**bits - 1).astype(np.uint8 if bits == 8 else np.uint16)


def _diff(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"pixels_differing": int(np.count_nonzero(d)), "max_abs": float(d.max()) if d.size else 0.0}


def stages(frame: np.ndarray, bits: int, device: torch.device) -> dict[str, object]:
    """NumPy against torch on ``device``: the network input (full-well detection on) and the guard."""
    adc = N.adc_max_for(frame.dtype, bits)
    config = N.NormalisationConfig(full_well="detect")
    f = frame.astype(np.float32)
    ft = torch.from_numpy(f).to(device)
    t0 = time.perf_counter()
    x, offset, scale = N.network_input(frame, adc, config)
    t1 = time.perf_counter()
    xt, offset_t, scale_t = D.network_input(ft, adc, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    fw, fwt = N.detect_full_well(f, adc, config), D.detect_full_well(ft, adc, config)
    rng = np.random.default_rng(7)
    out = (f + rng.normal(0.0, 3.0, f.shape)).astype(np.float32)  # a stand-in network output in DN
    prob = rng.random(f.shape, dtype=np.float32)
    row: dict[str, object] = {
        "shape": list(frame.shape), "bits": bits, "offset_scale_equal": (offset, scale) == (offset_t, scale_t),
        "full_well": None if fw is None else fw._asdict(), "full_well_torch": None if fwt is None else fwt._asdict(),
        "network_input": _diff(x, xt.cpu().numpy()), "network_input_ms": {"numpy": round((t1 - t0) * 1e3, 2),
                                                                          "torch": round((t2 - t1) * 1e3, 2)},
    }
    for name, gc in (("guard_measured_noise", G.GuardConfig(defect_threshold=0.6)),
                     ("guard_given_noise", G.GuardConfig(gain_e_per_dn=2.0, read_noise_dn=1.5, defect_threshold=None))):
        t0 = time.perf_counter()
        want = G.guard(frame, out, x[1] > 0.5, gc, prob)
        t1 = time.perf_counter()
        got, flags, noise = D.guard(ft, torch.from_numpy(out).to(device), torch.from_numpy(x[1] > 0.5).to(device), gc,
                                    torch.from_numpy(prob).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        fl = flags.cpu().numpy()
        row[name] = {"noise_equal": noise == want.noise, "output": _diff(want.output, got.cpu().numpy()),
                     "flags_differing": int(np.count_nonzero(fl != want.flags)), "counts": want.counts,
                     "ms": {"numpy": round((t1 - t0) * 1e3, 2), "torch": round((t2 - t1) * 1e3, 2)}}
    return row


def whole_path(device: str, frames: list[tuple[np.ndarray, int]]) -> list[dict[str, object]]:
    """torch-cuda with device_pre_post against without, through ``denoise_frame`` with the guard on (on a CPU:
    the torch backend with and without it, which must agree exactly)."""
    from cdae.engine.architecture import build_model
    from cdae.engine.backends import load_backend
    from cdae.engine.config import BackendOptions
    from cdae.engine.pipeline import denoise_frame
    from cdae.training.config import load_train_config

    root = Path(__file__).resolve().parent.parent
    arch = load_train_config(root / "training" / "configs" / "cdae-default.toml").architecture
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from cdae.engine.package import write_package

        torch.manual_seed(0)
        write_package(Path(tmp), name="p", version="1", state_dict=build_model(arch).state_dict(), architecture=arch,
                      normalisation=N.NormalisationConfig(full_well="detect"))
        pkg = Path(tmp) / "p" / "1"
        for precision in ("fp32", "bf16") if device != "cpu" else ("fp32",):
            if device == "cpu":
                from cdae.engine.backends import TorchBackend
                from cdae.engine.package import load_model

                manifest, model = load_model(pkg)
                on, off = TorchBackend(manifest, model, device_pre_post=True), TorchBackend(manifest, model)
                graphs = None
            else:
                opts = BackendOptions(device=device, precision=precision)
                on = load_backend("torch-cuda", pkg, opts)
                off = load_backend("torch-cuda", pkg, opts.model_copy(update={"device_pre_post": False}))
                graphs = load_backend("torch-cuda", pkg, opts.model_copy(update={"guard_graphs": True}))
            gc = G.GuardConfig(defect_threshold=0.6)
            for frame, bits in frames:
                for _ in range(3):  # eager, then graphs
                    a = denoise_frame(frame, off, bit_depth=bits, guard_config=gc)
                    b = denoise_frame(frame, on, bit_depth=bits, guard_config=gc)
                    c = denoise_frame(frame, graphs, bit_depth=bits, guard_config=gc) if graphs is not None else None
                assert a.flags is not None and b.flags is not None and a.residual is not None and b.residual is not None
                rows.append({"precision": precision, "shape": list(frame.shape), "bits": bits,
                             "denoised": _diff(a.denoised, b.denoised), "residual": _diff(a.residual, b.residual),
                             "defect_probability": _diff(a.defect_probability, b.defect_probability),
                             "flags_differing": int(np.count_nonzero(a.flags != b.flags)),
                             "ms": {"host_pre_post": round(a.inference_ms, 2),
                                    "device_pre_post": round(b.inference_ms, 2)}})
                if c is not None:  # the guard replayed from its CUDA graph against the eager device path: identical
                    assert c.flags is not None
                    rows[-1]["guard_graphs"] = {"denoised": _diff(b.denoised, c.denoised),
                                                "flags_differing": int(np.count_nonzero(b.flags != c.flags)),
                                                "captures": graphs.describe().get("guard_graph_captures"),
                                                "ms": round(c.inference_ms, 2)}
            on.close()
            off.close()
            if graphs is not None:
                graphs.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=".")
    p.add_argument("--max-side", type=int, default=2048, help="skip the cases with a larger side (slow on a CPU)")
    p.add_argument("--whole", action="store_true", help="on a CPU too: the whole frame path (slow there)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    frames = [(_frame(i, bits, shape), bits) for i, (bits, shape) in enumerate(CASES) if max(shape) <= args.max_side]
    result: dict[str, object] = {"device": str(device), "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                 "stages": [stages(fr, bits, device) for fr, bits in frames]}
    if device.type == "cuda" or args.whole:
        result["whole_path"] = whole_path(args.device, frames)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"device-parity-{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["stages"]:  # type: ignore[attr-defined]
        print(row["shape"], row["bits"], "input", row["network_input"], "guard",
              row["guard_measured_noise"]["output"], "flags", row["guard_measured_noise"]["flags_differing"],
              row["guard_given_noise"]["flags_differing"], flush=True)
    for row in result.get("whole_path", []):  # type: ignore[attr-defined]
        print("whole path", row, flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
