"""The engine's configuration: pydantic models only, light to import (no torch).

The site configuration (``cdae.deploy.site``), the CLI and the IOC's tools validate engine
settings against these models without pulling in torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cdae.endpoints import control_endpoint_for
from cdae.engine.guard import GuardConfig
from cdae.engine.kinds import BackendKind
from cdae.engine.protocol import DEFAULT_MAX_FRAME_PIXELS, MAX_HEADER_BYTES

DEFAULT_MODEL = "cdae-default"


def default_models_dir() -> Path:
    """``$CDAE_MODELS`` if set, else the store an install brings (``cdae.models``: the shipped default and one
    rollback; in a source checkout, its ``models/``)."""
    env = os.environ.get("CDAE_MODELS")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("cdae.models")  # found, not imported: the store holds no code
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "models"




class BackendOptions(BaseModel):
    """How a backend runs; part of the engine's configuration."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field("cuda:0", description="CUDA device for torch-cuda and tensorrt")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="torch-cuda autocast type (auto: bf16 where supported, else fp16); tensorrt: fp16 or fp32; "
        "torch-cpu: fp32 or bf16 (auto: bf16 where the CPU has it natively, the manifest records a passed bf16 parity "
        "check and it is faster here)"
    )
    cpu_kernels: Literal["fused", "module"] = Field(
        "fused", description="torch-cpu in bf16: the network as fused oneDNN calls (each convolution with its "
        "activation, no concatenated copies; cdae.engine.backends.cpu_fused) or the module under autocast")
    cuda_graphs: bool = Field(True, description="torch-cuda: capture a CUDA graph per steady input shape")
    max_cuda_graphs: int = Field(8, ge=1, le=64, description="captured shapes kept (a tiled frame uses one per tile "
                                 "shape: up to 9, corner, edge and inner tiles)")
    device_pre_post: bool = Field(
        True, description="torch-cuda: normalisation, full-well detection, denormalisation, the guard and the camera "
        "dtype on the GPU around the network (cdae.engine.device_frame), the frame uploaded once and the results "
        "downloaded once; false: those steps on the host in NumPy")
    host_statistics: bool = Field(
        True, description="torch-cuda with device_pre_post: the frame's offset and scale, its full-well search and the "
        "guard's noise model read on the host by the NumPy path's code (the frame is there already: a strided sample, "
        "no per-pixel work), the per-pixel work on the GPU; false: those on the GPU too (cdae.engine.device_frame's "
        "torch versions, the same numbers, each step a kernel launch and many a read back)")
    guard_graphs: bool = Field(
        False, description="torch-cuda with device_pre_post and cuda_graphs: the guard after its noise model replayed "
        "as one captured CUDA graph per frame shape (device_frame.GuardGraphs); off until its replay has been checked "
        "on a GPU (bench/gpu-checks.sh)")
    max_guard_graphs: int = Field(2, ge=1, le=16, description="guard graphs kept (frame shapes; each holds the "
                                  "guard's working memory, ~300 bytes a pixel)")
    tile_batch: int = Field(4, ge=1, le=64, description="torch-cuda with device_pre_post: a tiled frame's tiles of "
                            "one shape run up to this many to a network call (more GPU memory per call)")
    trt_opt_side: int = Field(1024, ge=8, description="TensorRT profile: the side it is tuned for")
    trt_max_side: int = Field(2048, ge=8, description="TensorRT profile: largest side; larger frames are tiled")
    trt_workspace_mib: int = Field(4096, ge=64)
    artefact_dir: Path | None = Field(
        None, description="where ONNX files and TensorRT plans are cached (default: <package>/cache, "
        "or ~/.cache/cdae when the package is read-only)"
    )


class CurveServerKeys(BaseModel):
    """CURVE on the engine's sockets: its key pair and the clients it lets in (key files: `cdae keys`)."""

    model_config = ConfigDict(extra="forbid")

    secret_key_file: Path = Field(description="the engine's NAME.key_secret (mode 0600)")
    allowed_clients_dir: Path = Field(description="folder of the public NAME.key files of the clients let in")


class CurveClientKeys(BaseModel):
    """CURVE for a client of the engine: its own key pair and the engine's public key."""

    model_config = ConfigDict(extra="forbid")

    secret_key_file: Path = Field(description="the client's NAME.key_secret (mode 0600)")
    server_public_key_file: Path = Field(description="the engine's public NAME.key")


class EngineConfig(BaseModel):
    """Everything the engine process needs; ``cdae engine`` flags are a thin layer over it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    bind: str = Field("tcp://127.0.0.1:5555", description="data endpoint (ROUTER); port 0 or * picks a free port")
    control: str | None = Field(None, description="control endpoint (REP); default: bind port + 1")
    models_dir: Path = Field(default_factory=default_models_dir, description="model store")
    model: str = Field(DEFAULT_MODEL, description="NAME[:VERSION] active at start")
    backend: BackendKind = "auto"
    backend_options: BackendOptions = Field(default_factory=BackendOptions)
    max_pixels: int = Field(2048 * 2048, ge=64, description="frames larger than this are tiled")
    tile_margin: int | None = Field(None, ge=0, description="tile overlap; default: the network's receptive radius")
    max_frame_pixels: int = Field(DEFAULT_MAX_FRAME_PIXELS, ge=1, description="larger declared frames are refused")
    queue: int = Field(2, ge=1, le=256, description="frames waiting per client; beyond it the oldest is dropped")
    max_clients: int = Field(64, ge=1, description="clients with frames waiting at once")
    receive_hwm: int = Field(64, ge=1, description="ZeroMQ receive high-water mark on the data socket (messages)")
    max_message_bytes: int | None = Field(
        None, ge=1024, description="largest message part accepted (ZMQ_MAXMSGSIZE): a peer sending more is "
        "disconnected before its bytes are read; default: the largest frame allowed, max_frame_pixels x 4 bytes"
    )
    max_queued_bytes: int | None = Field(
        None, ge=1, description="bytes of frames waiting, all clients together: a frame beyond it is answered "
        "'dropped'; also sizes the receive high-water mark; default: 2 largest messages, at least 256 MiB"
    )
    curve: CurveServerKeys | None = Field(
        None, description="CURVE encryption and client authentication on both sockets; needed off loopback"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice); 1 also keeps the "
                                "guard's impulse pass on one thread (by default two on frames of 1024² and more)")
    warmup_shape: tuple[int, int] = Field((256, 256), description="warm-up shape before the first frame arrives")
    timing_window: int = Field(2048, ge=16, description="frames the p50/p99 timings are computed over")
    guard: GuardConfig | None = Field(
        default_factory=GuardConfig, description="hold every output to the camera's noise and flag what moves "
        "further (cdae.engine.guard); false (None): the network's output as it is, unbounded")

    @field_validator("guard", mode="before")
    @classmethod
    def _guard_switch(cls, v: object) -> object:
        """``guard = false`` in a site file turns the bound off; ``true`` is the default bound."""
        if v is False:
            return None
        return {} if v is True else v

    @field_validator("bind", "control")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(tcp|ipc|inproc)://.+", v):
            raise ValueError(f"expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555, got {v!r}")
        return v

    def message_limit(self) -> int:
        """Largest message part accepted: configured, else the largest frame allowed (4-byte pixels)."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        return max(self.max_frame_pixels * 4, MAX_HEADER_BYTES)

    def queued_bytes_limit(self) -> int:
        """Bytes of frames allowed to wait: configured, else room for two of the largest messages."""
        if self.max_queued_bytes is not None:
            return self.max_queued_bytes
        return max(256 << 20, 2 * self.message_limit())

    def receive_hwm_for_bytes(self) -> int:
        """The data socket's RCVHWM: at most ``queued_bytes_limit()`` of largest-size messages per peer."""
        return max(1, min(self.receive_hwm, self.queued_bytes_limit() // self.message_limit()))

    def control_endpoint(self) -> str:
        """The control endpoint: as configured, else the data port + 1 on the same host."""
        if self.control:
            return self.control
        return control_endpoint_for(self.bind)


#: What of the engine's configuration a Triton frame-path model runs with (the rest is Triton's: ports,
#: queueing, model control); written into its config.pbtxt by `cdae export --to triton`.
FRAME_PATH_FIELDS = ("backend", "backend_options", "max_pixels", "tile_margin", "max_frame_pixels", "threads",
                     "warmup_shape", "guard")


def _frame_path_settings() -> type[BaseModel]:
    from pydantic import create_model

    fields = {k: (f.annotation, f) for k, f in EngineConfig.model_fields.items() if k in FRAME_PATH_FIELDS}
    return create_model("FramePathSettings", __config__=ConfigDict(extra="forbid"), **fields)  # type: ignore[call-overload]


#: The engine's own fields, validated the same way: ``backend`` ... ``guard`` (see FRAME_PATH_FIELDS).
FramePathSettings = _frame_path_settings()
