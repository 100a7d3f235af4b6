"""The filter IOC's configuration: what ``cdae ioc`` flags, TOML files and the site file's ``[cameras.NAME]``
sections are thin layers over. Pure data and validation: importing it starts nothing and needs no ZeroMQ
or CA client (the site file and the display generator read it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cdae import tomlfile
from cdae.endpoints import control_endpoint_for, is_triton, parse_tcp, parse_triton
from cdae.engine.config import CurveClientKeys
from cdae.health import HealthConfig
from cdae.ioc.frames import IocError, NDDataType
from cdae.ioc.pva import is_pva_source, p4p_missing, pva_channel
from cdae.ioc.pvs import QUEUE_SIZE_MAX, QUEUE_SIZE_MIN, STRING_MAX

__all__ = ["IocConfig", "load_ioc_config"]


class IocConfig(BaseModel):
    """The filter IOC; ``cdae ioc`` flags and TOML files are thin layers over it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str = Field(description="source prefix (an NDStdArrays plugin, e.g. 13SIM1:image1:), with width and "
                                    "height the full name of a plain waveform PV, or pva://CHANNEL (an NTNDArray, "
                                    "e.g. pva://13SIM1:Pva1:Image; pva://13SIM1:Pva1: adds Image) read over PV Access")
    prefix: str = Field(description="output prefix, e.g. 13SIM1:CDAE1:")
    engine: list[str] = Field(default_factory=lambda: ["tcp://127.0.0.1:5555"], min_length=1,
                              description="engine data endpoints (a list, or comma-separated; frames are spread "
                                          "over them), or one triton://HOST:PORT/MODEL (a Triton server's gRPC port "
                                          "and the model `cdae export --to triton` wrote)")
    control: str | None = Field(None, description="engine control endpoint (default: first engine's port + 1)")
    model: str | None = Field(None, description="NAME:VERSION to activate at start")
    array_suffix: str = Field("ArrayData", description="the source's image PV after the prefix")
    width: int | None = Field(None, ge=1, description="plain waveform source: frame width")
    height: int | None = Field(None, ge=1, description="plain waveform source: frame height")
    data_type: NDDataType | None = Field(None, description="plain waveform source: data type (default from CA type)")
    bit_depth: int | None = Field(None, ge=1, le=32, description="camera bit depth when the container is wider")
    queue_size: int = Field(2, ge=QUEUE_SIZE_MIN, le=QUEUE_SIZE_MAX, description="frames in flight to the engine")
    engine_timeout_s: float = Field(10.0, gt=0, description="no reply within this: the engine counts as down")
    status_period_s: float = Field(0.5, gt=0, description="engine control-channel poll period")
    residual: bool = Field(True, description="publish Residual:ArrayData")
    defect_map: bool = Field(True, description="publish DefectMap:ArrayData")
    pva: bool = Field(False, description="also serve the images over PV Access as NTNDArray (p4p, cdae[pva]): "
                                         "P Pva1:Image, P Pva1:Residual, P Pva1:DefectMap")
    bad_pixel_file: Path | None = Field(
        None, description="the camera's bad-pixel file (areaDetector NDPluginBadPixel JSON, e.g. from cdae badpixels): "
        "listed pixels are filled in the denoised frame and marked certain in DefectMap; BadPixelFile changes it")
    bad_pixel_dir: Path | None = Field(
        None, description="the only folder BadPixelFile may name files in (regular files, symlinks resolved); "
        "unset: BadPixelFile can only clear the map")
    max_elements: int | None = Field(None, ge=1, description="ArrayData length (default: the source's)")
    port_name: str = Field("CDAE1", max_length=STRING_MAX - 1)
    interfaces: list[str] | None = Field(None, description="CA server interfaces (default: caproto's)")
    curve: CurveClientKeys | None = Field(None, description="CURVE keys for an engine that requires them "
                                                            "(`cdae keys`): this IOC's key pair, the engine's public key")
    source_timeout_s: float = Field(5.0, gt=0, description="retry period while the source is not found")
    state_dir: Path | None = Field(None, description="where the IOC keeps what must survive a restart (the camera's "
                                   "live bad-pixel map); default systemd's $STATE_DIRECTORY, else nothing is kept")
    health: HealthConfig = Field(default_factory=HealthConfig,
                                 description="camera health: the live bad-pixel map, its rule and alarm limits")

    @field_validator("engine", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [s for s in v.split(",") if s] if isinstance(v, str) else v

    @field_validator("data_type", mode="before")
    @classmethod
    def _data_type_name(cls, v: object) -> object:
        return NDDataType[v] if isinstance(v, str) else v

    @field_validator("source")
    @classmethod
    def _pva_channel(cls, v: str) -> str:
        if is_pva_source(v):
            pva_channel(v)  # refuses an empty or spaced channel name
        return v

    @model_validator(mode="after")
    def _one_triton(self) -> IocConfig:
        if any(is_triton(e) for e in self.engine):
            if len(self.engine) != 1:
                raise ValueError("a triton:// engine is one URL: Triton spreads frames over its own instances "
                                 "(instance_group), not the IOC")
            parse_triton(self.engine[0])  # a malformed URL is refused here, with what is wrong
            if self.curve is not None:
                raise ValueError("curve keys are for cdae's ZeroMQ engine; Triton has no CURVE (see docs/triton.md)")
        return self

    @property
    def triton(self) -> bool:
        """Frames and control go to a Triton server (``triton://``), not to cdae's ZeroMQ engine."""
        return is_triton(self.engine[0])

    @property
    def plain_waveform(self) -> bool:
        return self.width is not None and self.height is not None

    @property
    def pva_source(self) -> bool:
        return is_pva_source(self.source)

    def pva_needed(self) -> str | None:
        """None when this configuration runs without p4p or p4p is there; else what to install."""
        return p4p_missing() if self.pva or self.pva_source else None

    def control_endpoint(self) -> str:
        """As configured, else the first engine's data port + 1 (the engine's own default)."""
        if self.triton:  # Triton answers both on its gRPC port
            return self.engine[0]
        if self.control:
            return self.control
        ep = parse_tcp(self.engine[0])
        if ep is None or ep.any_port:  # the IOC connects: it needs the engine's real port
            raise IocError(f"cannot derive the control endpoint from {self.engine[0]!r}; give --control")
        return control_endpoint_for(self.engine[0])


def load_ioc_config(path: str | Path | None, overrides: Mapping[str, object]) -> IocConfig:
    """A TOML file (optional) with flags on top; validated once."""
    data: dict[str, object] = {}
    if path is not None:
        data = tomlfile.load(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return IocConfig.model_validate(data)
