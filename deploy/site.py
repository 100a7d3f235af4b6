"""Site configuration: one TOML file for every camera, engine and the EPICS network of a site.

The file composes the models its services already validate (:class:`~cdae.engine.config.EngineConfig`,
:class:`~cdae.ioc.config.IocConfig`) instead of declaring their fields again; this module adds
only what spans services: engine names that cameras refer to, one model store, the EPICS
environment, and cross-checks (ports used twice, unknown engines, models not in the store).

:func:`check_site` reports every problem at once, each with the line of the file it comes from,
so an operator fixes a broken file in one pass instead of one error per restart.
"""

from __future__ import annotations

import re
from typing import TypeVar
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cdae import tomlfile
from cdae.endpoints import is_loopback, parse_tcp, parse_triton, ports_clash
from cdae.engine.config import BackendOptions, EngineConfig, FramePathSettings, default_models_dir
from cdae.ioc.config import IocConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also a systemd instance name (cdae-ioc@NAME)
_NAME_RULE = "use letters, digits, '_', '.', '-' (the name is a systemd instance name)"


class SiteError(Exception):
    """The site file cannot be read or a name in it is unknown."""


class EpicsSettings(BaseModel):
    """The EPICS environment every IOC of the site runs with (``EPICS_CA_*``, ``EPICS_CAS_*``, and for PV Access
    ``EPICS_PVA_*``, ``EPICS_PVAS_*``)."""

    model_config = ConfigDict(extra="forbid")

    addr_list: list[str] = Field(default_factory=list, description="EPICS_CA_ADDR_LIST: where clients search")
    auto_addr_list: bool = Field(True, description="EPICS_CA_AUTO_ADDR_LIST: also search every broadcast address")
    max_array_bytes: int = Field(
        100_000_000, ge=16384, description="EPICS_CA_MAX_ARRAY_BYTES: must hold the largest frame in bytes"
    )
    server_port: int | None = Field(None, ge=1, le=65535, description="EPICS_CA_SERVER_PORT (default 5064)")
    repeater_port: int | None = Field(None, ge=1, le=65535, description="EPICS_CA_REPEATER_PORT (default 5065)")
    server_interfaces: list[str] = Field(
        default_factory=list, description="EPICS_CAS_INTF_ADDR_LIST: interfaces the IOCs serve on (default: all)"
    )
    beacon_addr_list: list[str] = Field(default_factory=list, description="EPICS_CAS_BEACON_ADDR_LIST")
    pva_addr_list: list[str] = Field(default_factory=list,
                                     description="EPICS_PVA_ADDR_LIST: where a pva:// source searches for its camera")
    pva_auto_addr_list: bool = Field(True, description="EPICS_PVA_AUTO_ADDR_LIST: also search every broadcast address")

    def environment(self) -> dict[str, str]:
        """The variables to export, in the spelling EPICS (and caproto, pyepics) read."""
        env = {
            "EPICS_CA_AUTO_ADDR_LIST": "YES" if self.auto_addr_list else "NO",
            "EPICS_CA_MAX_ARRAY_BYTES": str(self.max_array_bytes),
        }
        if self.addr_list:
            env["EPICS_CA_ADDR_LIST"] = " ".join(self.addr_list)
        if self.server_port is not None:
            env["EPICS_CA_SERVER_PORT"] = str(self.server_port)
        if self.repeater_port is not None:
            env["EPICS_CA_REPEATER_PORT"] = str(self.repeater_port)
        if self.server_interfaces:  # the interfaces the IOCs serve on, CA and PVA (--pva) alike
            env["EPICS_CAS_INTF_ADDR_LIST"] = " ".join(self.server_interfaces)
            env["EPICS_PVAS_INTF_ADDR_LIST"] = " ".join(self.server_interfaces)
        env["EPICS_PVA_AUTO_ADDR_LIST"] = "YES" if self.pva_auto_addr_list else "NO"
        if self.pva_addr_list:
            env["EPICS_PVA_ADDR_LIST"] = " ".join(self.pva_addr_list)
        if self.beacon_addr_list:
            env["EPICS_CAS_BEACON_ADDR_LIST"] = " ".join(self.beacon_addr_list)
        return env


class EngineSection(EngineConfig):
    """One engine process: the engine's own config, less the site-wide store, plus its GPU."""

    gpu: int | None = Field(None, ge=0, description="GPU index for torch-cuda/tensorrt (sets backend_options.device)")


class TritonSection(BaseModel):
    """A Triton server that serves cdae's frame path (`cdae export --to triton`): cameras name it like an engine.

    ``gpus`` and the instance counts become the exported model's ``instance_group``; ``frame_path``
    (backend, tiling, guard, threads: the engine's own fields) its ``cdae_settings`` parameter.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="triton://HOST:PORT/MODEL: the server's gRPC port and the frame-path model")
    gpus: list[int] = Field(default_factory=list, description="GPU indices; one instance group per GPU")
    instances_per_gpu: int = Field(1, ge=1, le=16)
    cpu_instances: int = Field(1, ge=1, le=64, description="instances on the CPU when no GPU is listed")
    metrics_port: int = Field(8002, ge=1, le=65535, description="Triton's Prometheus metrics port (--metrics-port)")
    frame_path: FramePathSettings = Field(  # type: ignore[valid-type]
        default_factory=lambda: FramePathSettings(backend="torch-cpu"),
        description="the engine's frame-path settings inside Triton (backend, max_pixels, guard, threads, ...)")
    network_trusted: bool = Field(False, description="Triton has no authentication of its own: true only where its "
                                                     "ports are reachable from a trusted network alone")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_triton(v)
        return v

    @property
    def plan(self):  # noqa: ANN201 - cdae.deploy.triton.InstancePlan (imported lazily: tritonclient)
        from cdae.deploy.triton import InstancePlan

        return InstancePlan(gpus=self.gpus, instances_per_gpu=self.instances_per_gpu, cpu_instances=self.cpu_instances)


class CameraSection(IocConfig):
    """One camera's filter IOC: the IOC's own config, with engines named instead of addressed."""

    engine: list[str] = Field(min_length=1, description="engine name(s) from [engines.*] (frames are spread over "
                                                        "them), or one server name from [triton.*]")

    @field_validator("engine", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


class SiteConfig(BaseModel):
    """A site: its model store, EPICS network, engines and cameras."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    models_dir: Path = Field(default_factory=default_models_dir, description="model store shared by all engines")
    epics: EpicsSettings = Field(default_factory=EpicsSettings)
    engines: dict[str, EngineSection] = Field(default_factory=dict)
    triton: dict[str, TritonSection] = Field(default_factory=dict, description="Triton servers of the frame path")
    cameras: dict[str, CameraSection] = Field(default_factory=dict)

    @field_validator("engines", "cameras", "triton")
    @classmethod
    def _names(cls, v: dict[str, object]) -> dict[str, object]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r}: {_NAME_RULE}")
        return v

    def engine_config(self, name: str) -> EngineConfig:
        """What ``cdae engine --config FILE --name NAME`` runs."""
        section = self._get(self.engines, name, "engine")
        data = section.model_dump(exclude={"gpu"}, exclude_unset=True)
        data["models_dir"] = self.models_dir
        if section.gpu is not None:
            options = dict(data.get("backend_options") or {})
            options["device"] = f"cuda:{section.gpu}"
            data["backend_options"] = BackendOptions.model_validate(options).model_dump(exclude_unset=True)
        return EngineConfig.model_validate(data)

    def triton_section(self, name: str | None) -> TritonSection:
        """A ``[triton.NAME]`` section; without a name, the only one."""
        if name is None:
            if len(self.triton) != 1:
                raise SiteError(f"name the [triton.*] section (--name): the site file has {len(self.triton)}")
            return next(iter(self.triton.values()))
        return self._get(self.triton, name, "triton server")  # type: ignore[return-value]

    def ioc_config(self, name: str) -> IocConfig:
        """What ``cdae ioc --config FILE --name NAME`` runs: engine names resolved to endpoints."""
        section = self._get(self.cameras, name, "camera")
        if section.engine and section.engine[0] in self.triton:
            data = section.model_dump(exclude_unset=True)
            data["engine"] = [self.triton[section.engine[0]].url]
            data.pop("control", None)
            return IocConfig.model_validate(data)
        engines = [self.engine_config(e) for e in section.engine]
        data = section.model_dump(exclude_unset=True)
        data["engine"] = [e.bind for e in engines]
        if section.control is None:
            data["control"] = engines[0].control_endpoint()
        return IocConfig.model_validate(data)

    def effective(self) -> dict[str, object]:
        """What each service of the site runs with (``cdae config show``): the EPICS environment, every engine's
        and every camera's effective configuration, as JSON values."""
        import json

        return {"epics": self.epics.environment(),
                "engines": {n: json.loads(self.engine_config(n).model_dump_json()) for n in self.engines},
                "cameras": {n: json.loads(self.ioc_config(n).model_dump_json()) for n in self.cameras}}

    @staticmethod
    def _get(table: dict[str, BaseModel], name: str, kind: str) -> BaseModel:
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise SiteError(f"no {kind} named {name!r} in the site file (known: {known})")
        return table[name]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site file, and where."""

    line: int | None
    where: str
    message: str

    def __str__(self) -> str:
        at = f"{self.line}: " if self.line else ""
        return f"{at}{self.where}: {self.message}" if self.where else f"{at}{self.message}"


def _read_toml(path: Path) -> tuple[str, dict[str, object]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise SiteError(f"cannot read the site file {path}: {e.strerror or e}") from e
    try:
        return text, tomlfile.loads(text)
    except tomlfile.TOMLDecodeError as e:
        raise SiteError(f"{path}: not valid TOML: {e}") from e


_Section = TypeVar("_Section", "EngineSection", "CameraSection")


def load_site(path: str | Path) -> SiteConfig:
    """Read and validate a site file; the first problems are in the error (``check_site`` lists all)."""
    path = Path(path)
    text, data = _read_toml(path)
    problems = _problems(text, data, path.parent)
    if problems:
        listed = "\n  ".join(str(p) for p in problems)
        raise SiteError(f"{path}: {len(problems)} problem(s) (run `cdae config check {path}`):\n  {listed}")
    site = SiteConfig.model_validate(data)
    return site.model_copy(update={"models_dir": resolve_models_dir(site.models_dir, path.parent),
                                   "engines": {n: _curve_paths(e, path.parent) for n, e in site.engines.items()},
                                   "cameras": {n: _curve_paths(c, path.parent) for n, c in site.cameras.items()}})


def check_site(path: str | Path, *, check_models: bool = True) -> list[Problem]:
    """Every problem of a site file (schema, cross-references, model store), each with its line."""
    path = Path(path)
    try:
        text, data = _read_toml(path)
    except SiteError as e:
        line = _decode_error_line(str(e))
        return [Problem(line, "", str(e))]
    return _problems(text, data, path.parent, check_models=check_models)


def _decode_error_line(message: str) -> int | None:
    m = re.search(r"at line (\d+)", message)
    return int(m.group(1)) if m else None


def _problems(text: str, data: dict[str, object], base: Path, *, check_models: bool = False) -> list[Problem]:
    """Schema errors of each section, then the cross-checks between the sections that are valid."""
    lines = KeyLines(text)
    found: list[Problem] = []

    def validate(model: type[BaseModel], value: object, loc: tuple[str, ...]) -> BaseModel | None:
        try:
            return model.model_validate(value)
        except ValidationError as e:
            for err in e.errors():
                full = loc + tuple(str(p) for p in err["loc"])
                found.append(Problem(lines.find(full), ".".join(full), err["msg"]))
            return None

    # Sections one by one, so that one bad camera does not hide the problems of the others.
    top = {k: v for k, v in data.items() if k not in ("engines", "cameras", "epics", "triton")}
    sections: dict[str, dict[str, object]] = {}
    for table in ("engines", "cameras", "triton"):
        value = data.get(table, {})
        if isinstance(value, dict):
            sections[table] = value
        else:
            found.append(Problem(lines.find((table,)), table, "expected tables such as [" + table + ".NAME]"))
            sections[table] = {}
    shell = validate(SiteConfig, top, ())
    epics = validate(EpicsSettings, data.get("epics", {}), ("epics",))
    engines = {n: validate(EngineSection, v, ("engines", n)) for n, v in sections["engines"].items()}
    cameras = {n: validate(CameraSection, v, ("cameras", n)) for n, v in sections["cameras"].items()}
    tritons = {n: validate(TritonSection, v, ("triton", n)) for n, v in sections["triton"].items()}
    if shell is None:
        return found
    site = SiteConfig.model_construct(
        models_dir=resolve_models_dir(shell.models_dir, base), epics=epics or EpicsSettings(),
        engines={n: _curve_paths(e, base) for n, e in engines.items() if e is not None},
        triton={n: t for n, t in tritons.items() if t is not None},
        cameras={n: c for n, c in cameras.items() if c is not None},
    )
    for table, names in (("engines", sections["engines"]), ("cameras", sections["cameras"]),
                         ("triton", sections["triton"])):
        for name in names:
            if not _NAME.match(name):
                found.append(Problem(lines.find((table, name)), f"{table}.{name}", _NAME_RULE))
    broken = {n for n, e in engines.items() if e is None} | {n for n, t in tritons.items() if t is None}
    found.extend(_cross_checks(site, lines, check_models, broken_engines=broken))
    return sorted(found, key=lambda p: (p.line or 0, p.where))


def _curve_paths(section: _Section, base: Path) -> _Section:
    """Key files named relative to the site file, like the model store (not to a service's working
    directory): an engine's key and allowed clients, a camera's key and its engine's public key."""
    if section.curve is None:
        return section
    fields = [k for k in ("secret_key_file", "allowed_clients_dir", "server_public_key_file")
              if k in type(section.curve).model_fields]
    curve = section.curve.model_copy(update={k: resolve_models_dir(getattr(section.curve, k), base) for k in fields})
    return section.model_copy(update={"curve": curve})


def resolve_models_dir(models_dir: Path, base: Path) -> Path:
    """A relative store is relative to the site file, not to wherever a service happens to start."""
    return models_dir if models_dir.is_absolute() else (base / models_dir)


def _cross_checks(site: SiteConfig, lines: KeyLines, check_models: bool,
                  broken_engines: set[str] = frozenset()) -> Iterator[Problem]:
    binds: list[tuple[tuple[str, int], str]] = []  # every fixed listener so far: (host, port) and who

    def clash(key: tuple[str, int] | None, where: tuple[str, ...], shown: str) -> Iterator[Problem]:
        if key is None:
            return
        other = next((who for k, who in binds if ports_clash(k, key)), None)
        if other is not None:
            yield Problem(lines.find(where), ".".join(where), f"{shown} is already used by {other}")
        else:
            binds.append((key, ".".join(where)))

    for name, eng in site.engines.items():
        if "models_dir" in eng.model_fields_set:
            yield Problem(lines.find(("engines", name, "models_dir")), f"engines.{name}.models_dir",
                          "the model store is site-wide: set models_dir at the top of the file")
        for what, endpoint in (("bind", eng.bind), ("control", eng.control_endpoint())):
            yield from clash(_endpoint_key(endpoint), ("engines", name, what), endpoint)
        yield from _curve_checks(name, eng, lines)
        if eng.backend in ("torch-cpu", "passthrough") and eng.gpu is not None:
            yield Problem(lines.find(("engines", name, "gpu")), f"engines.{name}.gpu",
                          f"backend {eng.backend} does not use a GPU; remove gpu or choose tensorrt/torch-cuda")
    gpus: dict[int, str] = {}
    for name, eng in site.engines.items():
        if eng.gpu is not None:
            if eng.gpu in gpus:
                yield Problem(lines.find(("engines", name, "gpu")), f"engines.{name}.gpu",
                              f"GPU {eng.gpu} is already used by engine {gpus[eng.gpu]} (one engine per GPU)")
            gpus.setdefault(eng.gpu, name)
    prefixes: dict[str, str] = {}
    for name, cam in site.cameras.items():
        tritons = [e for e in cam.engine if e in site.triton]
        if tritons and len(cam.engine) > 1:
            yield Problem(lines.find(("cameras", name, "engine")), f"cameras.{name}.engine",
                          f"{tritons[0]} is a Triton server: a camera names one, alone (Triton spreads frames over "
                          "its own instances)")
        for eng in cam.engine:
            if eng in broken_engines or eng in site.triton:
                continue  # already reported, or a Triton server (checked below)
            if eng not in site.engines:
                known = ", ".join(sorted([*site.engines, *site.triton])) or "none defined"
                yield Problem(lines.find(("cameras", name, "engine")), f"cameras.{name}.engine",
                              f"no engine named {eng!r} (engines: {known})")
            elif _endpoint_key(site.engines[eng].bind) is None:
                yield Problem(lines.find(("engines", eng, "bind")), f"engines.{eng}.bind",
                              f"camera {name} needs a fixed port, not {site.engines[eng].bind}")
        if cam.prefix in prefixes:
            yield Problem(lines.find(("cameras", name, "prefix")), f"cameras.{name}.prefix",
                          f"{cam.prefix!r} is already the prefix of camera {prefixes[cam.prefix]}: PV names would clash")
        prefixes.setdefault(cam.prefix, name)
        if cam.prefix == cam.source or cam.source.startswith(cam.prefix):
            yield Problem(lines.find(("cameras", name, "prefix")), f"cameras.{name}.prefix",
                          f"the output prefix {cam.prefix!r} would shadow the source {cam.source!r}")
    for name, t in site.triton.items():  # a server on this machine listens on its gRPC and metrics ports too
        try:
            ep = parse_triton(t.url)
        except ValueError:
            continue  # reported where the url is validated
        if is_loopback(t.url):
            yield from clash((ep.host, ep.port), ("triton", name, "url"), f"port {ep.port}")
            yield from clash(("*", t.metrics_port), ("triton", name, "metrics_port"), f"metrics port {t.metrics_port}")
    yield from _triton_checks(site, lines)
    if check_models:
        yield from _model_checks(site, lines)


def _triton_checks(site: SiteConfig, lines: KeyLines) -> Iterator[Problem]:
    """Triton servers: names apart from the engines', no authentication off loopback unless said trusted,
    GPUs not shared with a cdae engine."""
    engine_gpus = {e.gpu: n for n, e in site.engines.items() if e.gpu is not None}
    for name, t in site.triton.items():
        where = f"triton.{name}"
        if name in site.engines:
            yield Problem(lines.find(("triton", name)), where, f"{name!r} is also an engine name: cameras could not "
                                                               "tell which they mean")
        if not is_loopback(t.url) and not t.network_trusted:
            yield Problem(lines.find(("triton", name, "url")), f"{where}.url",
                          f"{t.url} is reachable from the network and Triton has no authentication: anyone who "
                          "reaches it can send frames and load or unload models; bind it to loopback, or put it on "
                          "a trusted network and set network_trusted = true")
        for g in t.gpus:
            if g in engine_gpus:
                yield Problem(lines.find(("triton", name, "gpus")), f"{where}.gpus",
                              f"GPU {g} is already used by engine {engine_gpus[g]}")


def _curve_checks(name: str, eng: EngineSection, lines: KeyLines) -> Iterator[Problem]:
    """An engine reachable off loopback needs CURVE: anyone who reaches it could send frames and swap models."""
    where = f"engines.{name}"
    if eng.curve is None:
        for what, endpoint in (("bind", eng.bind), ("control", eng.control_endpoint())):
            if not is_loopback(endpoint):
                yield Problem(lines.find(("engines", name, what)), f"{where}.{what}",
                              f"{endpoint} is reachable from the network without authentication: set "
                              f"[{where}.curve] secret_key_file and allowed_clients_dir (make keys with `cdae keys`), "
                              "or bind 127.0.0.1")
        return
    from cdae.engine.curve import load_secret
    from cdae.engine.errors import EngineError

    try:
        load_secret(eng.curve.secret_key_file)
    except EngineError as e:
        yield Problem(lines.find(("engines", name, "curve", "secret_key_file")), f"{where}.curve.secret_key_file", str(e))
    if not eng.curve.allowed_clients_dir.is_dir():
        yield Problem(lines.find(("engines", name, "curve", "allowed_clients_dir")), f"{where}.curve.allowed_clients_dir",
                      f"{eng.curve.allowed_clients_dir} is not a folder (put the clients' public .key files there)")


def _model_checks(site: SiteConfig, lines: KeyLines) -> Iterator[Problem]:
    if not site.models_dir.is_dir():
        yield Problem(lines.find(("models_dir",)), "models_dir", f"{site.models_dir} is not a folder")
        return
    from cdae.engine.package import ModelPackageError, ModelRegistry  # torch: only when models are checked

    registry = ModelRegistry(site.models_dir)
    wanted = [(("engines", n, "model"), e.model) for n, e in site.engines.items()]
    wanted += [(("triton", n, "url"), parse_triton(t.url).model) for n, t in site.triton.items()]
    wanted += [(("cameras", n, "model"), c.model) for n, c in site.cameras.items() if c.model]
    for loc, ref in wanted:
        try:
            registry.resolve(ref)
        except ModelPackageError as e:
            yield Problem(lines.find(loc), ".".join(loc), str(e))


def _endpoint_key(endpoint: str) -> tuple[str, int] | None:
    """A fixed TCP listener's (host, port); ipc:// and inproc:// names keyed by themselves (port -1); None
    for a free port picked at start, which cannot clash."""
    ep = parse_tcp(endpoint)
    if ep is None:
        return (endpoint, -1)
    if ep.any_port:
        return None
    return (ep.host, int(ep.port))


class KeyLines:
    """Where each key of a TOML text is: pydantic error locations → line numbers.

    TOML parsers keep no positions, so this scans table headers (``[cameras.cam1]``) and
    ``key = value`` lines itself. A location that names no line of its own (a missing key, a
    value in an inline table) falls back to the nearest enclosing table's line.
    """

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_.\"' -]+?)\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            if line.lstrip().startswith("#"):
                continue
            m = self._HEADER.match(line)
            if m:
                table = self._split(m.group(1))
                self.lines.setdefault(table, number)
                continue
            m = self._KEY.match(line)
            if m:
                self.lines.setdefault(table + self._split(m.group(1)), number)

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        return tuple(part.strip().strip("\"'") for part in dotted.split("."))

    def find(self, loc: tuple[str, ...]) -> int | None:
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None


def epics_env_file(site: SiteConfig) -> str:
    """The site's EPICS settings as a systemd ``EnvironmentFile`` (also valid for ``sh``'s ``.``)."""
    lines = ["# EPICS environment of the cdae services; generated by `cdae config epics-env`."]
    lines += [f'{k}="{v}"' for k, v in site.epics.environment().items()]
    return "\n".join(lines) + "\n"
