"""Artefacts derived from a model package: its ONNX export, the TensorRT plan cache, and their checks.

- ONNX: ``export_onnx`` writes the package's network with dynamic height and width;
  ``onnx_artefact`` finds the one `cdae export` recorded beside the package, else exports into the cache.
- TensorRT plans: ``plan_key`` names a plan by GPU model + compute capability + TensorRT version +
  shape profile (:class:`ShapeProfile`) + weights, ``artefact_dir`` says where the cache lives.
- Integrity: an artefact beside a package is used only if its manifest records its sha256 and a passed
  parity check (``read_verified_artefact``); a file the engine made in its cache has its sha256 beside it
  (``write_cached``, ``record_cache_hash``), checked before every later use (``cache_intact``).

No GPU library is imported here: TensorRT's builder lives with its backend.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cdae.engine.errors import BackendError, BackendUnavailable
from cdae.engine.package import Manifest, sha256_file

ONNX_EXPORT_FORMAT = 1  # bump when the exported graph changes (it is part of every cache key)
ONNX_OPSET = 18
EXPORT_DIR = "artefacts"  # `cdae export` writes here, beside weights.safetensors
ONNX_INPUT = "input"
ONNX_OUTPUTS = ("restored", "defect_probability")

Log = Callable[[str], None]


# --- integrity ---------------------------------------------------------------------------------

class ArtefactIntegrityError(BackendError):
    """An exported ONNX file or TensorRT plan is not the one its manifest records: never loaded, never fallen back from."""


def read_verified_artefact(pkg: Path, manifest: Manifest, path: Path, kind: str) -> bytes:
    """The bytes of an artefact beside the package, if the manifest records this file with this sha256
    and a passed parity check (what `cdae export` writes and `cdae models verify` checks)."""
    data = path.read_bytes()  # hashed and then used as read: nothing can change between check and use
    try:
        rel = path.relative_to(pkg).as_posix()
    except ValueError:
        rel = None
    records = [a for a in manifest.artefacts if a.kind == kind and Path(a.path).as_posix() == rel]
    if not records:
        raise ArtefactIntegrityError(
            f"{path}: not recorded in the manifest of {manifest.ref} (artefacts beside a package come from "
            f"`cdae export`, which records their sha256); refusing to load an unverified {kind} file")
    record = records[-1]
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256:
        raise ArtefactIntegrityError(
            f"{path}: sha256 {digest[:16]}… does not match the manifest's {record.sha256[:16]}… (changed after "
            f"`cdae export`); refusing to load (`cdae models verify` lists every problem)")
    if record.parity.get("passed") is not True:
        raise ArtefactIntegrityError(f"{path}: its parity check against torch did not pass; refusing to load")
    return data


def cache_hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def record_cache_hash(path: Path, data: bytes | None = None) -> None:
    """Beside a file the engine made in its cache: its sha256, checked before every later use."""
    digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    tmp = cache_hash_file(path).with_name(cache_hash_file(path).name + f".{os.getpid()}.tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, cache_hash_file(path))


def cache_intact(path: Path, log: Log, data: bytes | None = None) -> bool:
    """Whether a cached artefact is byte for byte what the engine made; if not it is made again, not used."""
    try:
        want = cache_hash_file(path).read_text().strip()
    except OSError:
        want = ""
    got = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    if want and got == want:
        return True
    why = "its sha256 differs from the one recorded when it was made" if want else "no sha256 was recorded for it"
    log(f"cached {path}: {why}; making it again instead of loading it")
    return False


def write_cached(path: Path, data: bytes) -> None:
    """Write a file the engine made into its cache: atomically, with its sha256 recorded beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    record_cache_hash(path, data)


# --- where and under which key ----------------------------------------------------------------

@dataclass(frozen=True)
class ShapeProfile:
    """A TensorRT optimisation profile over (height, width), all multiples of the network's ``multiple``."""

    channels: int
    min_hw: tuple[int, int]
    opt_hw: tuple[int, int]
    max_hw: tuple[int, int]

    @classmethod
    def for_model(cls, manifest: Manifest, opt_side: int, max_side: int) -> ShapeProfile:
        m = manifest.architecture.multiple
        mx = max(m, max_side // m * m)
        opt = min(mx, max(m, -(-opt_side // m) * m))
        return cls(manifest.architecture.in_channels, (m, m), (opt, opt), (mx, mx))

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        c = self.channels
        return (1, c, *self.min_hw), (1, c, *self.opt_hw), (1, c, *self.max_hw)

    def describe(self) -> str:
        (a, b), (c, d), (e, f) = self.min_hw, self.opt_hw, self.max_hw
        return f"c{self.channels}-{a}x{b}-{c}x{d}-{e}x{f}"


def plan_key(
    *, gpu_name: str, compute_capability: tuple[int, int], trt_version: str, profile: ShapeProfile,
    precision: str, weights_sha256: str,
) -> str:
    """The cache key (and file stem) of a TensorRT plan.

    A plan runs only on the TensorRT version and GPU architecture that built it, for the shapes of
    its profile, and holds the weights it was built from: any change means a rebuild.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    trt_v = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    cc = f"sm{compute_capability[0]}{compute_capability[1]}"
    return f"{gpu}-{cc}-trt{trt_v}-{precision}-{profile.describe()}-w{weights_sha256[:12]}-x{ONNX_EXPORT_FORMAT}"


def artefact_dir(pkg: Path, manifest: Manifest, configured: Path | None) -> Path:
    """Where derived artefacts of a package live: beside it when writable, else the user cache."""
    if configured is not None:
        d = Path(configured) / manifest.name / manifest.version
    else:
        d = Path(pkg) / "cache"
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            pass
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        d = base / "cdae" / manifest.name / manifest.version
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- ONNX export -------------------------------------------------------------------------------

class _ExportWrapper(nn.Module):
    """What the ONNX graph computes: restored frame and defect probability (sigmoid inside)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored, logit = self.model(x)
        return restored, torch.sigmoid(logit)


def export_onnx(model: nn.Module, manifest: Manifest, path: Path, max_side: int = 4096) -> Path:
    """Export a package's network to ONNX with dynamic height and width (multiples of the network's).

    Needs ``onnx`` and ``onnxscript`` (torch's exporter). Written atomically; returns ``path``.
    """
    for mod in ("onnx", "onnxscript"):
        if importlib.util.find_spec(mod) is None:
            raise BackendUnavailable(f"ONNX export needs {mod}; install the GPU extra: pip install 'cdae[gpu]' {mod}")
    m = manifest.architecture.multiple
    c = manifest.architecture.in_channels
    wrapper = _ExportWrapper(model.float().eval().cpu()).eval()
    blocks = max(2, max_side // m)
    # height and width are multiples of 2**depth: say so, or export trips over the U-Net's skip concat
    hb = torch.export.Dim("height_blocks", min=1, max=blocks)
    wb = torch.export.Dim("width_blocks", min=1, max=blocks)
    example = torch.zeros(1, c, 4 * m, 6 * m)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    try:
        with warnings.catch_warnings():
            # the exporter reports its progress and internal deprecations as warnings and log lines
            warnings.simplefilter("ignore")
            quiet.setLevel(logging.ERROR)
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                dynamic_shapes=({2: m * hb, 3: m * wb},), opset_version=ONNX_OPSET, external_data=False,
                verbose=False,
            )
            if program is None:
                raise BackendError("torch.onnx.export returned no program")
            program.save(str(tmp), external_data=False)
    finally:
        quiet.setLevel(level)
    os.replace(tmp, path)
    return path


def onnx_artefact(pkg: Path, manifest: Manifest, model: nn.Module, cache: Path, max_side: int, log: Log) -> Path:
    """The package's ONNX file: an exported one recorded beside the package (its sha256 checked), else the
    cache's (exported once, its sha256 recorded beside it and checked at every later load)."""
    recorded = [Path(pkg) / a.path for a in manifest.artefacts if a.kind == "onnx"]
    for exported in [*recorded, Path(pkg) / EXPORT_DIR / f"{manifest.name}-{manifest.version}.onnx"]:
        if exported.is_file():
            read_verified_artefact(Path(pkg), manifest, exported, "onnx")
            return exported
    path = cache / "onnx" / f"{manifest.name}-{manifest.version}-w{manifest.weights_sha256[:12]}-x{ONNX_EXPORT_FORMAT}.onnx"
    if not path.is_file() or not cache_intact(path, log):
        log(f"exporting {manifest.ref} to {path}")
        try:
            export_onnx(model, manifest, path, max_side=max_side)
        except BackendError:
            raise
        except Exception as e:  # the exporter raises many types; the engine reports one
            raise BackendError(f"ONNX export of {manifest.ref} failed: {type(e).__name__}: {e}") from e
        record_cache_hash(path)
    return path

