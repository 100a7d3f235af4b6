"""The model package: ``models/<name>/<version>/{weights.safetensors, manifest.json}``.

One module owns the format: writing, verifying (sha256 of the weights against the manifest) and
loading (safetensors only: nothing is ever unpickled), and the registry that resolves
``NAME:VERSION`` references in a model store.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from pathlib import Path
from typing import Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, SerializerFunctionWrapHandler, ValidationError, model_serializer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cdae import __version__
from cdae.engine.architecture import ArchitectureConfig, build_model
from cdae.engine.config import DEFAULT_MODEL, default_models_dir  # noqa: F401  (re-exported: part of the store API)
from cdae.engine.errors import EngineError
from cdae.engine.normalise import NormalisationConfig

MANIFEST_FORMAT = 1  # the package's layout (weights.safetensors beside manifest.json)
#: The manifest's schema. Older manifests are migrated when read (``migrate_manifest``), never rewritten.
SCHEMA_VERSION = 2
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

MetricValue = Union[float, int, str, None]


class ModelPackageError(EngineError):
    """A model package is missing, malformed, tampered with or of an unknown architecture."""


class EnsembleSpec(BaseModel):
    """How a package's weights are organised when it fuses several members."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["single", "parameter_average", "output_average"] = "single"
    members: int = Field(1, ge=1)
    member_refs: list[str] = Field(default_factory=list, description="NAME:VERSION of each member")


class ArtefactRecord(BaseModel):
    """A deployable form of the package (``cdae export``): an ONNX graph, a TensorRT plan, or the package's
    own weights run in BF16 on the CPU (``torch-bf16``: ``path`` is the weights file, checked like the others)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["onnx", "tensorrt", "torch-bf16"]
    path: str = Field(description="relative to the package folder")
    sha256: str
    bytes: int
    precision: str = Field(description="fp32, fp16 or bf16")
    created_utc: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    tools: dict[str, str] = Field(default_factory=dict, description="versions (torch, onnx, tensorrt, GPU...)")
    parity: dict[str, JsonValue] = Field(default_factory=dict, description="comparison with the torch reference")


class DataProvenance(BaseModel):
    """Real data a model was fitted to, identified by content: a camera recording (``cdae record``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["recording"] = "recording"
    path: str = Field(description="where it was read from (informative: the hash identifies it)")
    sha256: str
    bytes: int = Field(ge=0)
    source: str = Field("", description="the camera PV it was recorded from")
    frames_train: int = Field(0, ge=0)
    frames_held_out: int = Field(0, ge=0)
    camera_profile_sha256: str | None = Field(None, description="the camera profile used (saved in the package)")


class _Record(BaseModel):
    """A typed record with room for more: known keys are checked, any other is kept as it came (extra="allow").

    It is written back with exactly the keys it was given (a known key never given is not written as
    null), and reads like the dict it was before schema 2: a read-only :class:`~collections.abc.Mapping`
    of the keys it was given (``r["key"]``, ``r.get(key)``, ``key in r``, ``{**r}``, ``Model.model_validate(r)``).
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @model_serializer(mode="wrap")
    def _given_keys_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    def keys(self) -> KeysView[str]:
        return self.model_dump().keys()

    def values(self) -> ValuesView[Any]:
        return self.model_dump().values()

    def items(self) -> ItemsView[str, Any]:
        return self.model_dump().items()

    def __getitem__(self, key: str) -> Any:  # noqa: ANN401 - a JSON value
        if key not in self.model_fields_set:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.model_fields_set

    def __iter__(self) -> Iterator[str]:  # type: ignore[override] - a Mapping's keys, not BaseModel's (name, value) pairs
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.model_fields_set)

    def get(self, key: str, default: Any = None) -> Any:  # noqa: ANN401 - a JSON value
        return self[key] if key in self else default


Mapping.register(_Record)


class TrainingConfigRecord(_Record):
    """The effective training configuration a package was made with (``cdae.training.config.TrainConfig``'s
    JSON; the engine types its top level, the sections stay JSON as they were written)."""

    name: str | None = None
    version: str | None = None
    seed: int | None = None
    threads: int | None = None
    device: str | None = None
    init_from: str | None = Field(None, description="NAME:VERSION the weights started from")
    architecture: dict[str, JsonValue] | None = None
    normalisation: dict[str, JsonValue] | None = None
    data: dict[str, JsonValue] | None = None
    optim: dict[str, JsonValue] | None = None
    loss: dict[str, JsonValue] | None = None
    stages: list[dict[str, JsonValue]] | None = Field(None, description="a staged recipe: each stage trains on from the last")
    real: dict[str, JsonValue] | None = Field(None, description="fine-tuning on a camera's recordings")


class MetricsRecord(_Record):
    """What training, evaluation and fine-tuning measured (each adds its keys); ``val_<baseline>_psnr_db``
    and others are kept as extra keys."""

    val_loss: float | None = None
    val_psnr_db: float | None = None
    val_noisy_psnr_db: float | None = None
    val_median3_psnr_db: float | None = None
    train_seconds: float | None = None
    cpu_seconds: float | None = None
    epochs: int | None = None
    steps: int | None = None
    stages: list[dict[str, JsonValue]] | None = Field(None, description="each stage's last validation")
    held_out: dict[str, JsonValue] | None = Field(None, description="`cdae evaluate` on the held-out simulated set")
    real_held_out: dict[str, JsonValue] | None = None
    sim_held_out: dict[str, JsonValue] | None = None
    real_objective: str | None = None
    finetune_gate: dict[str, JsonValue] | None = None


class Manifest(BaseModel):
    """Everything needed to know how a model was made and how to run it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: int = MANIFEST_FORMAT
    schema_version: int = Field(SCHEMA_VERSION, ge=SCHEMA_VERSION, le=SCHEMA_VERSION,
                                description="older schemas are migrated when read (migrate_manifest)")
    name: str
    version: str
    architecture: ArchitectureConfig
    normalisation: NormalisationConfig = Field(default_factory=NormalisationConfig)
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    seed: int | None = None
    data_generator_version: str | None = None
    code_version: str = __version__
    command: str | None = Field(None, description="the command that made this package")
    parent: str | None = Field(None, description="NAME:VERSION this model was fine-tuned from")
    data: list[DataProvenance] = Field(
        default_factory=list,
        description="real recordings the weights were fitted to (simulated data is named by seed and generator version)",
    )
    training_config: TrainingConfigRecord = Field(default_factory=TrainingConfigRecord)
    metrics: MetricsRecord = Field(default_factory=MetricsRecord)
    environment: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="what the weights were trained with (Python, torch, numpy, scipy, CPU, threads): a re-run "
        "is bit for bit only where this matches",
    )
    weights_sha256: str
    weights_bytes: int
    parameters: int
    created_utc: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    notes: str = ""
    artefacts: list[ArtefactRecord] = Field(default_factory=list, description="exports verified against torch")

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Manifest:
        """A copy; the fields in ``update`` are validated (a plain dict of metrics becomes a :class:`MetricsRecord`)."""
        copy = super().model_copy(deep=deep)
        if not update:
            return copy
        return type(self).model_validate({**dict(copy), **update})


# --- older manifests ---------------------------------------------------------------------------

def _schema_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 (no ``schema_version``; ``training_config`` and ``metrics`` free-form dicts) → 2, where both
    are typed records that keep every other key: the old contents validate as they are."""
    return {**data, "schema_version": 2}


#: One explicit step from each older schema to the next.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _schema_1_to_2}


def migrate_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """A manifest's JSON in any schema this engine knows, brought to :data:`SCHEMA_VERSION` step by step.

    A manifest without ``schema_version`` is schema 1. The input is not modified.
    """
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise ModelPackageError(f"manifest schema {version!r}: this engine reads schemas 1 to {SCHEMA_VERSION}")
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        assert data["schema_version"] == version + 1, f"migration from schema {version} skipped a step"
        version += 1
    return data


def validate_name(kind: str, value: str) -> str:
    if not _NAME_RE.match(value):
        raise ModelPackageError(f"invalid model {kind} {value!r}: use letters, digits, '_', '.', '-' (max 64)")
    return value


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one (``+dirty`` if modified)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}" + (".dirty" if dirty else "")


def write_package(
    root: Path | str,
    *,
    name: str,
    version: str,
    state_dict: dict[str, torch.Tensor],
    architecture: ArchitectureConfig,
    overwrite: bool = False,
    **manifest_fields: object,
) -> Path:
    """Write weights (safetensors) and manifest atomically; returns the package directory."""
    validate_name("name", name)
    validate_name("version", version)
    pkg = Path(root) / name / version
    if pkg.exists() and not overwrite:
        raise ModelPackageError(f"package {name}:{version} already exists at {pkg}")
    pkg.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(state_dict.items())}
    weights = pkg / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o644)  # a model store is read by the services' own user
    os.replace(tmp, weights)
    manifest = Manifest(
        name=name,
        version=version,
        architecture=architecture,
        weights_sha256=sha256_file(weights),
        weights_bytes=weights.stat().st_size,
        parameters=sum(t.numel() for t in tensors.values()),
        **manifest_fields,  # type: ignore[arg-type]
    )
    write_manifest(pkg, manifest)
    return pkg


def write_manifest(pkg: Path, manifest: Manifest) -> None:
    with tempfile.NamedTemporaryFile("w", dir=pkg, suffix=".tmp", delete=False) as f:
        f.write(manifest.model_dump_json(indent=2) + "\n")
    os.chmod(f.name, 0o644)
    os.replace(f.name, pkg / MANIFEST_FILE)


def read_manifest(pkg: Path | str) -> Manifest:
    path = Path(pkg) / MANIFEST_FILE
    try:
        raw = path.read_text()
    except OSError as e:
        raise ModelPackageError(f"{path}: cannot read manifest ({e.strerror or e})") from e
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelPackageError(f"{path}: manifest is not valid JSON ({e})") from e
    if isinstance(data, dict):
        arch = data.get("architecture")
        if isinstance(arch, dict) and arch.get("name") not in (None, "cdae-unet"):
            raise ModelPackageError(f"{path}: unknown architecture {arch.get('name')!r}; this engine knows 'cdae-unet'")
        if data.get("format") not in (None, MANIFEST_FORMAT):
            raise ModelPackageError(f"{path}: manifest format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
        try:
            data = migrate_manifest(data)
        except ModelPackageError as e:
            raise ModelPackageError(f"{path}: {e}") from e
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelPackageError(f"{path}: invalid manifest at '{where}': {first['msg']}") from e


def load_package(pkg: Path | str) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Read and verify a package: manifest valid, weights' sha256 matches, tensors load without pickle."""
    pkg = Path(pkg)
    manifest = read_manifest(pkg)
    weights = pkg / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelPackageError(f"{pkg}: missing {WEIGHTS_FILE}")
    digest = sha256_file(weights)
    if digest != manifest.weights_sha256:
        raise ModelPackageError(
            f"{weights}: sha256 {digest[:16]}… does not match the manifest's {manifest.weights_sha256[:16]}…"
            " (tampered or truncated weights); refusing to load"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelPackageError(f"{weights}: not a readable safetensors file ({e})") from e
    return manifest, state


def instantiate(manifest: Manifest, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build the network a manifest describes and load its weights (strictly: every key must match)."""
    members = manifest.ensemble.members if manifest.ensemble.mode == "output_average" else 1
    model = build_model(manifest.architecture, members=members)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise ModelPackageError(f"{manifest.ref}: weights do not fit the architecture in the manifest ({msg})") from e
    return model.eval()


def load_model(pkg: Path | str) -> tuple[Manifest, nn.Module]:
    manifest, state = load_package(pkg)
    return manifest, instantiate(manifest, state)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME:VERSION`` or ``NAME`` (latest version) → (name, version or None)."""
    name, _, version = ref.partition(":")
    validate_name("name", name)
    if version:
        validate_name("version", version)
    return name, version or None


def _version_key(v: str) -> tuple:
    parts = re.split(r"[._-]", v)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


class ModelRegistry:
    """A model store directory: lists packages and resolves references (no loading until asked)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def versions(self, name: str) -> list[str]:
        d = self.root / name
        if not d.is_dir():
            return []
        vs = [p.name for p in d.iterdir() if (p / MANIFEST_FILE).is_file() and _NAME_RE.match(p.name)]
        return sorted(vs, key=_version_key)

    def refs(self) -> list[str]:
        return [f"{n}:{v}" for n in self.names() for v in self.versions(n)]

    def resolve(self, ref: str) -> Path:
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.refs()) or "none"
            raise ModelPackageError(f"no model named {name!r} in {self.root} (available: {known})")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise ModelPackageError(f"model {name!r} has no version {version!r} (available: {', '.join(versions)})")
        return self.root / name / version

    def load(self, ref: str) -> tuple[Manifest, nn.Module]:
        return load_model(self.resolve(ref))
