"""The environment a model was trained in, and what a re-run of its recipe can promise.

Training on the CPU is bit-reproducible for a fixed config, seed and thread count *in one
environment*: the float reductions of torch's kernels depend on the torch build, the instruction
set it dispatches to and the CPU, and the simulated data on numpy and scipy. So every package
records that environment, and a re-run is judged by one rule:

- the recorded environment matches this one: the weights' sha256 must be the same (bit for bit);
- it does not: the validation metrics must agree within :data:`TOLERANCE` (the weights cannot).
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What must be equal for a bit-for-bit promise (the rest of the record is for the reader).
#: ``cpu_id`` and ``cpu_isa`` since session 16: a hypervisor that names every CPU "AMD EPYC" (one capability,
#: "AVX512") hid a Zen 5 behind the name a Zen 4-era record carried, and the default's recipe, the same code
#: bit for bit on one machine (``weights_sha256`` of a 64-step run), gave other weights from its first epoch.
#: A record without them matches nothing: judged by the metrics.
MATCH_KEYS = ("python", "torch", "numpy", "scipy", "cpu_capability", "cpu_model", "cpu_id", "cpu_isa", "threads",
              "device")

#: Elsewhere, the metrics of a re-run must agree within these: absolute dB for PSNR, relative for loss.
TOLERANCE = {"val_psnr_db": 0.3, "val_loss_relative": 0.05}

_PACKAGES = ("torch", "numpy", "scipy", "safetensors", "pydantic")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The instruction-set extensions torch's kernels (oneDNN, its own AVX dispatch) may choose by.
_ISA = re.compile(r"^(sse\S*|ssse3|avx\S*|fma|f16c|amx\S*|bmi\d|adx|vpclmulqdq|gfni|vaes|sha_ni)$")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_id(info: dict[str, str]) -> str:
    """Vendor, family, model, stepping and cache size: what tells CPUs apart that share a model name (kernels
    block by cache size)."""
    labels = {"vendor_id": "", "cpu family": "family ", "model": "model ", "stepping": "stepping ",
              "cache size": "cache "}
    if not any(k in info for k in labels):
        return platform.processor() or platform.machine()
    return " ".join(f"{label}{info.get(k, '?')}" for k, label in labels.items())


def cpu_id() -> str:
    """This machine's CPU as :func:`training_environment` records it (vendor, family, model, stepping, cache): what a
    benchmark names beside its device, since two CPU kinds share a model name (\"Intel(R) Xeon(R) Processor\")."""
    return _cpu_id(_cpuinfo())


def _cpu_isa(info: dict[str, str]) -> str:
    """The vector and crypto extensions the CPU reports, sorted (``/proc/cpuinfo`` ``flags``)."""
    return " ".join(sorted(f for f in info.get("flags", "").split() if _ISA.match(f)))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def training_environment(threads: int, device: str = "cpu") -> dict[str, Any]:
    """This process's environment as a manifest records it."""
    import torch

    info = _cpuinfo()
    env: dict[str, Any] = {
        "python": ".".join(map(str, sys.version_info[:3])),
        **{p: _version(p) for p in _PACKAGES},
        "torch_build": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _cpu_model(),
        "cpu_id": _cpu_id(info),
        "cpu_isa": _cpu_isa(info),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "threads": threads,
        "device": device,
    }
    return env


def environment_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The :data:`MATCH_KEYS` on which two environments differ, as ``key: recorded -> current``."""
    return [f"{k}: {recorded.get(k)} -> {current.get(k)}" for k in MATCH_KEYS if recorded.get(k) != current.get(k)]


@dataclass(frozen=True)
class Verdict:
    """How a re-run compares with its recorded result."""

    kind: str  # "bit-for-bit", "within-tolerance", "different"
    reasons: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.kind != "different"

    def __str__(self) -> str:
        head = {
            "bit-for-bit": "reproduced bit for bit (same environment, same sha256)",
            "within-tolerance": "reproduced within tolerance (the environment differs, so the weights may; "
            "the metrics agree)",
            "different": "NOT reproduced",
        }[self.kind]
        return head + "".join(f"\n  {r}" for r in self.reasons)


def compare_run(recorded: dict[str, Any], rerun: dict[str, Any]) -> Verdict:
    """Judge a re-run against a recorded one; each is ``{"weights_sha256", "metrics", "environment"}``."""
    diffs = environment_differences(recorded.get("environment") or {}, rerun.get("environment") or {})
    if not diffs:
        if recorded["weights_sha256"] == rerun["weights_sha256"]:
            return Verdict("bit-for-bit", ())
        return Verdict("different", (
            f"the environment matches but the weights differ: sha256 {recorded['weights_sha256'][:12]} -> "
            f"{rerun['weights_sha256'][:12]} (the code, the config or the data changed)",))
    reasons = ["environment differs: " + "; ".join(diffs)]
    rec_m, new_m = recorded.get("metrics") or {}, rerun.get("metrics") or {}
    bad = []
    dpsnr = abs(float(new_m.get("val_psnr_db", math.nan)) - float(rec_m.get("val_psnr_db", math.nan)))
    if not dpsnr <= TOLERANCE["val_psnr_db"]:
        bad.append(f"val_psnr_db {rec_m.get('val_psnr_db')} -> {new_m.get('val_psnr_db')} "
                   f"(allowed +-{TOLERANCE['val_psnr_db']} dB)")
    old_loss, new_loss = float(rec_m.get("val_loss", math.nan)), float(new_m.get("val_loss", math.nan))
    if not abs(new_loss - old_loss) <= TOLERANCE["val_loss_relative"] * abs(old_loss):
        bad.append(f"val_loss {old_loss} -> {new_loss} (allowed +-{TOLERANCE['val_loss_relative']:.0%})")
    if bad:
        return Verdict("different", tuple(reasons + bad))
    reasons.append(f"val_psnr_db {rec_m.get('val_psnr_db'):.3f} -> {new_m.get('val_psnr_db'):.3f} dB, "
                   f"val_loss {old_loss:.5f} -> {new_loss:.5f}")
    return Verdict("within-tolerance", tuple(reasons))


def recorded_run(reference: str, models_dir: Path | None = None) -> dict[str, Any]:
    """The record a re-run should reproduce (``cdae train --compare``): a run's JSON record (``weights_sha256``,
    ``metrics``, ``environment``), a package directory, or NAME:VERSION in ``models_dir``. Raises
    :class:`LookupError`, saying what is missing, where there is none."""
    import json

    from cdae.engine.config import default_models_dir
    from cdae.engine.package import ModelRegistry, read_manifest

    ref = Path(reference)
    if ref.is_file() and ref.suffix == ".json":
        return json.loads(ref.read_text())
    if (ref / "manifest.json").is_file():
        return read_manifest(ref).model_dump(mode="json")
    if "/" in reference or ref.exists():
        raise LookupError("no package or run record there to compare with")
    try:
        pkg = ModelRegistry(models_dir or default_models_dir()).resolve(reference)
        return read_manifest(pkg).model_dump(mode="json")
    except Exception as e:  # noqa: BLE001 - the message says what is missing
        raise LookupError(f"no recorded package to compare with ({e})") from e
