"""``cdae export``: deployable artefacts of a model package, each verified against torch.

An artefact is trusted only after it reproduced the torch CPU reference on simulated damaged
frames through the engine's own frame path (normalise → network → denormalise), measured in the
camera's DN. The verdict and its numbers are recorded in the package's manifest beside the file's
sha256, so the engine and an operator can tell what was checked, with which tool versions, where.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cdae.engine.artefacts import EXPORT_DIR, export_onnx
from cdae.engine.backends import Backend, OnnxRuntimeBackend, TensorRTBackend, TorchCPUBackend, cpu_bf16_native
from cdae.engine.config import BackendOptions
from cdae.engine.errors import BackendError
from cdae.engine.package import (
    WEIGHTS_FILE,
    ArtefactRecord,
    Manifest,
    load_model,
    read_manifest,
    sha256_file,
    write_manifest,
)
from cdae.engine.pipeline import denoise_frame

Log = Callable[[str], None]
Target = Literal["onnx", "tensorrt", "torch-bf16"]

#: Frames the parity check runs: square, wide, not a multiple of the network's (padding), larger.
PARITY_SIZES: tuple[tuple[int, int], ...] = ((256, 256), (192, 320), (200, 300), (512, 512))
#: Simulator stream of the parity frames: disjoint from training (0..), validation and evaluation.
PARITY_SEED = 7919
#: Largest |artefact − torch| allowed, as a fraction of the camera's full scale, per precision.
#: FP32 graphs differ from torch by float rounding only (~1e-6 of full scale); FP16 convolutions
#: keep ~3 significant digits, and the range compression amplifies that for bright pixels.
#: BF16 keeps ~2.4 digits, and its worst pixels are those the defect head is unsure of, where the output
#: blends the raw and the restored value: the check that matters for it is the restoration's quality.
MAX_ABS_FULL_SCALE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2.5e-2}
#: Root-mean-square bound, same units: catches a small error everywhere that the maximum would let through.
RMS_FULL_SCALE = {"fp32": 1e-5, "fp16": 5e-4, "bf16": 1e-3}
#: What a reduced-precision form may cost on held-out simulated frames against the FP32 model: mean PSNR
#: (against the clean truth) and the RMSE on bright features (the physicist's brightest data).
MAX_PSNR_DROP_DB = 0.2
MAX_BRIGHT_RMSE_RATIO = 1.02
#: Simulated frames of that check: the simulator's test stream (never trained or tuned on), 256x256;
#: the real-scene set (:mod:`cdae.training.real_scenes`) is checked beside them where it is installed.
QUALITY_FRAMES = 16
QUALITY_SIZE = 256


class ExportError(Exception):
    """An artefact could not be made, or it does not reproduce the torch reference."""


@dataclass(frozen=True)
class Parity:
    """How far an artefact's frames are from torch's, in DN and as a fraction of full scale."""

    frames: int
    sizes: list[tuple[int, int]]
    max_abs_dn: float
    rms_dn: float
    max_abs_full_scale: float
    rms_full_scale: float
    max_abs_defect_probability: float
    tolerance_max_abs_full_scale: float
    tolerance_rms_full_scale: float

    @property
    def passed(self) -> bool:
        return (self.max_abs_full_scale <= self.tolerance_max_abs_full_scale
                and self.rms_full_scale <= self.tolerance_rms_full_scale
                and self.max_abs_defect_probability <= 0.05)

    def as_record(self) -> dict[str, object]:
        return {"reference": "torch-cpu", "frames": self.frames, "sizes": [f"{w}x{h}" for h, w in self.sizes],
                "simulator_seed": PARITY_SEED, "max_abs_dn": self.max_abs_dn, "rms_dn": self.rms_dn,
                "max_abs_full_scale": self.max_abs_full_scale, "rms_full_scale": self.rms_full_scale,
                "max_abs_defect_probability": self.max_abs_defect_probability,
                "tolerance_max_abs_full_scale": self.tolerance_max_abs_full_scale,
                "tolerance_rms_full_scale": self.tolerance_rms_full_scale, "passed": self.passed}

    def describe(self) -> str:
        return (f"{self.frames} frames: max |Δ| {self.max_abs_dn:.4g} DN ({self.max_abs_full_scale:.2e} of full scale, "
                f"limit {self.tolerance_max_abs_full_scale:.2g}), rms {self.rms_dn:.3g} DN ({self.rms_full_scale:.2e}, "
                f"limit {self.tolerance_rms_full_scale:.2g}), defect probability max |Δ| "
                f"{self.max_abs_defect_probability:.2e}")


def parity_frames(count: int, sizes: Sequence[tuple[int, int]] = PARITY_SIZES) -> list[tuple[np.ndarray, int]]:
    """Simulated damaged frames as a camera sends them (integer DN) with their bit depth."""
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames

    out = []
    for f in simulated_frames(DataConfig(), PARITY_SEED, 0, count, list(sizes)):
        dtype = np.uint8 if f.bit_depth <= 8 else np.uint16
        out.append((np.clip(np.rint(f.noisy), 0, f.adc_max).astype(dtype), f.bit_depth))
    return out


def measure_parity(candidate: Backend, reference: Backend, precision: str, frames: int = 8) -> Parity:
    """Run both backends through the engine's frame path on the same frames; compare in DN."""
    frames_in = parity_frames(frames)
    max_abs = sq = n = 0.0
    max_abs_fs = sq_fs = 0.0
    max_prob = 0.0
    for frame, bits in frames_in:
        # float32 frames keep the outputs in unrounded DN: the comparison sees the network, not rounding
        as_float = frame.astype(np.float32)
        a = denoise_frame(as_float, candidate, bit_depth=bits, want_residual=False)
        b = denoise_frame(as_float, reference, bit_depth=bits, want_residual=False)
        d = np.abs(a.denoised.astype(np.float64) - b.denoised.astype(np.float64))
        full_scale = float(2**bits - 1)
        max_abs, max_abs_fs = max(max_abs, float(d.max())), max(max_abs_fs, float(d.max()) / full_scale)
        sq += float((d**2).sum())
        sq_fs += float(((d / full_scale) ** 2).sum())
        n += d.size
        max_prob = max(max_prob, float(np.abs(a.defect_probability - b.defect_probability).max()))
    return Parity(len(frames_in), sorted({f.shape for f, _ in frames_in}), max_abs, (sq / n) ** 0.5, max_abs_fs,
                  (sq_fs / n) ** 0.5, max_prob, MAX_ABS_FULL_SCALE[precision], RMS_FULL_SCALE[precision])


@dataclass(frozen=True)
class Quality:
    """What a reduced-precision form changes in the restoration itself, on frames whose truth is known."""

    frames_set: str
    frames: int
    psnr_db_reference: float
    psnr_db_candidate: float
    bright_rmse_reference: float
    bright_rmse_candidate: float
    worst_frame_delta_db: float

    @property
    def psnr_drop_db(self) -> float:
        return self.psnr_db_reference - self.psnr_db_candidate

    @property
    def bright_ratio(self) -> float:
        return self.bright_rmse_candidate / self.bright_rmse_reference if self.bright_rmse_reference > 0 else 1.0

    @property
    def passed(self) -> bool:
        return self.psnr_drop_db <= MAX_PSNR_DROP_DB and self.bright_ratio <= MAX_BRIGHT_RMSE_RATIO

    def as_record(self) -> dict[str, object]:
        return {"frames": self.frames, "set": self.frames_set, "psnr_db_fp32": self.psnr_db_reference,
                "psnr_db": self.psnr_db_candidate, "psnr_drop_db": self.psnr_drop_db,
                "worst_frame_delta_db": self.worst_frame_delta_db, "bright_rmse_ratio": self.bright_ratio,
                "limit_psnr_drop_db": MAX_PSNR_DROP_DB, "limit_bright_rmse_ratio": MAX_BRIGHT_RMSE_RATIO,
                "passed": self.passed}

    def describe(self) -> str:
        return (f"{self.frames} {self.frames_set} frames: PSNR {self.psnr_db_candidate:.2f} dB vs "
                f"{self.psnr_db_reference:.2f} (drop {self.psnr_drop_db:+.3f} dB, limit {MAX_PSNR_DROP_DB}; worst frame "
                f"{self.worst_frame_delta_db:+.2f}), bright-feature RMSE x{self.bright_ratio:.4f} "
                f"(limit x{MAX_BRIGHT_RMSE_RATIO})")


def measure_quality(candidate: Backend, reference: Backend, frames: Sequence[object], frames_set: str) -> Quality:
    """PSNR against the truth and bright-feature RMSE of both backends through the frame path, on frames with
    ``noisy``, ``clean``, ``defect_mask``, ``adc_max`` and ``bit_depth`` (simulated or real-scene frames)."""
    from cdae.training.metrics import bright_feature_mask, psnr

    ps: dict[str, list[float]] = {"ref": [], "cand": []}
    sq = {"ref": 0.0, "cand": 0.0}
    n = 0
    for f in frames:
        noisy = np.clip(np.rint(f.noisy), 0, f.adc_max).astype(np.float32)  # type: ignore[attr-defined]
        bright = bright_feature_mask(f.clean, f.defect_mask, 0.98)  # type: ignore[attr-defined]
        n += int(bright.sum())
        for key, backend in (("ref", reference), ("cand", candidate)):
            out = denoise_frame(noisy, backend, bit_depth=f.bit_depth, want_residual=False).denoised  # type: ignore[attr-defined]
            ps[key].append(psnr(out, f.clean, f.adc_max))  # type: ignore[attr-defined]
            sq[key] += float((((out - f.clean) / f.adc_max)[bright] ** 2).sum())  # type: ignore[attr-defined]
    delta = np.array(ps["cand"]) - np.array(ps["ref"])
    return Quality(frames_set, len(ps["ref"]), float(np.mean(ps["ref"])), float(np.mean(ps["cand"])),
                   (sq["ref"] / max(n, 1)) ** 0.5, (sq["cand"] / max(n, 1)) ** 0.5, float(delta.min()))


def quality_sets(log: Log, frames: int = QUALITY_FRAMES, real_scenes: bool = True) -> dict[str, list[object]]:
    """The frames a reduced-precision form is judged on: the simulator's held-out test stream, and the
    real-scene set (photographs pip packages ship, through the camera model) where those packages are installed."""
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.real_scenes import MissingRealImages, build_frames, load_real_images

    data = DataConfig()
    sets: dict[str, list[object]] = {
        f"held-out simulated {QUALITY_SIZE}x{QUALITY_SIZE}":
            list(simulated_frames(data, data.test_seed, 0, frames, [(QUALITY_SIZE, QUALITY_SIZE)]))}
    if not real_scenes:
        return sets
    try:
        sets["real-scene"] = list(build_frames(load_real_images()))
    except MissingRealImages as e:
        log(f"real-scene set not checked: {e}")
    return sets


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tools(*dists: str) -> dict[str, str]:
    found = {d: _version(d) for d in ("torch", *dists)}
    return {"python": platform.python_version(), "machine": platform.machine(),
            **{k: v for k, v in found.items() if v}}


def export_package(pkg: Path, to: Target, *, fp16: bool = False, frames: int = 8, device: str = "cuda:0",
                   max_side: int = 2048, opt_side: int = 1024, log: Log = lambda s: None,
                   quality_frames: int = QUALITY_FRAMES, real_scenes: bool = True) -> ArtefactRecord:
    """Make, verify and record one artefact of the package at ``pkg``; returns its manifest record.

    The artefact is written into ``<pkg>/artefacts/`` and stays only if it passes the parity check.
    ``torch-bf16`` writes no file: the check (``frames`` parity frames, then ``quality_frames`` held-out
    simulated frames and, with ``real_scenes``, the real-scene set) is recorded against the weights.
    """
    pkg = Path(pkg)
    manifest, model = load_model(pkg)  # sha256-verified before anything is derived from it
    if not os.access(pkg, os.W_OK):
        raise ExportError(f"{pkg} is read-only: export on the machine that owns the model store")
    reference = TorchCPUBackend(manifest, model)
    if to == "torch-bf16":
        return _record_torch_bf16(pkg, manifest, reference, frames, log, quality_frames, real_scenes)
    out_dir = pkg / EXPORT_DIR
    out_dir.mkdir(exist_ok=True)
    if to == "onnx":
        if fp16:
            raise ExportError("ONNX is exported in FP32 (ONNX Runtime on CPU has no FP16 speed-up); "
                              "--fp16 applies to --to tensorrt")
        path, precision, candidate, tools = _export_onnx(pkg, manifest, model, out_dir, max_side, log)
    elif to == "tensorrt":
        precision = "fp16" if fp16 else "fp32"
        path, candidate, tools = _export_tensorrt(pkg, manifest, model, out_dir, precision, device, max_side,
                                                  opt_side, log)
    else:
        raise ExportError(f"unknown export target {to!r}; expected onnx or tensorrt")
    try:
        log(f"comparing {path.name} with torch on {frames} simulated frames")
        parity = measure_parity(candidate, reference, precision, frames)
    finally:
        candidate.close()
    log(parity.describe())
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path.name} does not reproduce torch: {parity.describe()}; artefact removed")
    record = ArtefactRecord(kind=to, path=str(path.relative_to(pkg)), sha256=sha256_file(path),
                            bytes=path.stat().st_size, precision=precision, tools=tools,
                            parity=parity.as_record())  # type: ignore[arg-type]
    record_artefact(pkg, record)
    return record


def _record_torch_bf16(pkg: Path, manifest: Manifest, reference: Backend, frames: int, log: Log,
                       quality_frames: int, real_scenes: bool) -> ArtefactRecord:
    """The package's own weights run in BF16 on this CPU: checked against FP32, recorded for ``auto``."""
    import torch

    if not cpu_bf16_native():
        raise ExportError("torch-bf16 needs a CPU with native BF16 (AVX512-BF16 or AMX) to be checked and to pay off; "
                          f"this one has {torch.backends.cpu.get_cpu_capability()} without it")
    _, model = load_model(pkg)
    candidate = TorchCPUBackend(manifest, model, "bf16")
    log(f"comparing {manifest.ref} in bf16 ({candidate.kernels} kernels) with fp32 on {frames} simulated frames")
    parity = measure_parity(candidate, reference, "bf16", frames)
    log(parity.describe())
    qualities = []
    for name, frames_of_set in quality_sets(log, quality_frames, real_scenes).items():
        qualities.append(measure_quality(candidate, reference, frames_of_set, name))
        log(qualities[-1].describe())
    if not (parity.passed and all(q.passed for q in qualities)):
        said = "; ".join([parity.describe(), *(q.describe() for q in qualities)])
        raise ExportError(f"{manifest.ref} in bf16 does not reproduce fp32: {said}; nothing recorded "
                          "(torch-cpu keeps running it in fp32)")
    weights = pkg / WEIGHTS_FILE
    tools = {**_tools(), "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "bf16_kernels": candidate.kernels}
    record = ArtefactRecord(kind="torch-bf16", path=WEIGHTS_FILE, sha256=sha256_file(weights),
                            bytes=weights.stat().st_size, precision="bf16", tools=tools,
                            parity={**parity.as_record(), "quality": [q.as_record() for q in qualities],
                                    "passed": True})  # type: ignore[arg-type]
    record_artefact(pkg, record)
    return record


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record_artefact(pkg: Path, record: ArtefactRecord) -> Manifest:
    """Add (or replace: same kind and path) an artefact in the package's manifest."""
    manifest = read_manifest(pkg)
    kept = [a for a in manifest.artefacts if (a.kind, a.path) != (record.kind, record.path)]
    manifest = manifest.model_copy(update={"artefacts": [*kept, record]})
    write_manifest(pkg, manifest)
    return manifest


def _export_onnx(pkg: Path, manifest: Manifest, model: object, out_dir: Path, max_side: int,
                 log: Log) -> tuple[Path, str, Backend, dict[str, str]]:
    try:
        import onnx
    except ImportError as e:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'cdae[onnx]'") from e
    path = out_dir / f"{manifest.name}-{manifest.version}.onnx"
    log(f"exporting {manifest.ref} to {path} (dynamic height and width up to {max_side})")
    try:
        export_onnx(model, manifest, path, max_side=max_side)  # type: ignore[arg-type]
    except BackendError as e:
        raise ExportError(str(e)) from e
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"the ONNX checker rejects {path.name}: {e}") from e
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if not all(isinstance(d, str) and d for d in dims[2:]):
        path.unlink(missing_ok=True)
        raise ExportError(f"{path.name}: height and width are not dynamic (input dims {dims})")
    candidate = OnnxRuntimeBackend(manifest, model, pkg, BackendOptions(), onnx_path=path)  # type: ignore[arg-type]
    return path, "fp32", candidate, _tools("onnx", "onnxscript", "onnxruntime")


def _export_tensorrt(pkg: Path, manifest: Manifest, model: object, out_dir: Path, precision: str, device: str,
                     max_side: int, opt_side: int, log: Log) -> tuple[Path, Backend, dict[str, str]]:
    options = BackendOptions(device=device, precision=precision, trt_max_side=max_side, trt_opt_side=opt_side)
    try:
        backend = TensorRTBackend(manifest, model, pkg, options, log)  # type: ignore[arg-type]
    except BackendError as e:
        raise ExportError(f"cannot build a TensorRT plan here: {e}") from e
    path = out_dir / backend.plan_path.name
    if backend.plan_path != path:
        shutil.copyfile(backend.plan_path, path)
        sidecar = backend.plan_path.with_suffix(".json")
        if sidecar.is_file():
            shutil.copyfile(sidecar, path.with_suffix(".json"))
    import torch

    tools = {**_tools("tensorrt", "onnx"), "gpu": torch.cuda.get_device_name(backend.torch_device),
             "profile": backend.profile.describe()}
    return path, backend, tools


def verify_artefacts(pkg: Path) -> list[str]:
    """Problems with the recorded artefacts of a package: missing files, changed bytes, failed parity."""
    manifest = read_manifest(pkg)
    problems = []
    for a in manifest.artefacts:
        f = Path(pkg) / a.path
        if not f.is_file():
            problems.append(f"{a.kind} artefact {a.path} is missing")
        elif sha256_file(f) != a.sha256:
            problems.append(f"{a.kind} artefact {a.path}: sha256 differs from the manifest (changed after export)")
        elif a.parity.get("passed") is not True:
            problems.append(f"{a.kind} artefact {a.path}: parity check did not pass")
    return problems
