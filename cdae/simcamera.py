"""``cdae sim-camera``: an areaDetector-like caproto IOC serving simulated, damaged diagnostic frames.

One camera = one detector drawn once (:func:`cdae.training.defects.sample_defect_params`) and one
fixed defect layout (:func:`~cdae.training.defects.sample_defect_layout`): the same dead and hot
pixels and bad lines frame after frame, like one damaged camera; noise, radiation hits and glints
are new in every frame. Scenes come from the training simulator. To serve high rates the camera
simulates a bank of ``bank`` frames once (per size) and cycles through it, each sent with a new
UniqueId and timestamp. ``<prefix>Clean:ArrayData`` carries the noiseless frame of the same
UniqueId, so tests can check that denoised frames are closer to the truth than raw ones.

A camera can be given damage and noise the shipped model never saw (``hot_columns``,
``read_noise_e``), can look at one fixed target (``static_scene``: the same scene, new noise in
every frame, as a diagnostic camera on a screen) and has a shutter (``ShutterControl``): closed,
it serves dark frames (bias, read noise, hot pixels and lines, radiation hits; no light).

For the camera-health tests it can also age at run time (``damage``, opt-in: new hot, dead or
stuck pixels from frame N on, a hot or dead column from frame M on, a radiation burst; see
:class:`DamageEvent`), draw fresh noise for every frame instead of cycling the bank's
(``fresh_noise``: otherwise a noise outlier of the bank recurs every ``bank`` frames, as a
defect would), and show static point sources (``point_sources``, blurred by optics wider than
the guard's narrowest PSF). :func:`apply_damage` is the same for ``bench/health.py``.
With ``pva`` the camera also serves each frame as an NTNDArray over PV Access, as areaDetector's
NDPluginPva does, on ``<prefix>Pva1:Image`` (p4p; ``cdae ioc --source pva://<prefix>Pva1:`` reads it).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cdae.ioc.frames import FrameInfo, NDDataType, RateMeter, ca_element_dtype, numpy_dtype, posix_to_epics, to_ca
from cdae.ioc.publish import write_image
from cdae.ioc.pva import IMAGE, NTNDArrayServer
from cdae.ioc.pvs import CameraPVs, camera_pvs
from cdae.ioc.runner import ca_server_port, cancel_all, serve_pvdb
from cdae.lines import log, say

CameraDataType = Literal["UInt8", "Int16", "UInt16", "Float32"]
DamageKind = Literal["hot_pixels", "dead_pixels", "stuck_pixels", "hot_column", "dead_column", "radiation"]
_DAMAGE_LEVEL = {"hot_pixels": 0.05, "dead_pixels": 0.0, "stuck_pixels": 0.5, "hot_column": 0.05,
                 "dead_column": 0.1, "radiation": 5000.0}


class DamageEvent(BaseModel):
    """Damage a simulated camera takes at run time (``cdae sim-camera --damage KIND@FRAME[,key=value...]``).

    ``level``: hot pixels and columns, their extra offset as a fraction of the span above bias
    (0.05); stuck pixels, the DN they read as a fraction of the ADC maximum (0.5); dead pixels and
    columns, their residual response (0 and 0.1); radiation, hits per megapixel per frame (5000).
    Pixels (and a column without ``x``) are drawn from ``seed``, at least 2 px from the edges.
    """

    model_config = ConfigDict(extra="forbid")

    kind: DamageKind
    at_frame: int = Field(ge=0, description="the camera's frame index (0 = the first frame served) it starts at")
    frames: int | None = Field(None, ge=1, description="how many frames it lasts (radiation: default 1); "
                                                       "others: None = from then on")
    count: int = Field(1, ge=1, le=100_000, description="pixels (hot, dead, stuck)")
    x: int | None = Field(None, ge=0, description="the column (hot_column, dead_column); None: drawn")
    level: float | None = Field(None, ge=0, description="see the class docstring; None: the kind's default")
    seed: int = Field(0, ge=0)

    @property
    def value(self) -> float:
        return _DAMAGE_LEVEL[self.kind] if self.level is None else self.level

    def active(self, index: int) -> bool:
        length = self.frames if self.frames is not None else (1 if self.kind == "radiation" else None)
        return index >= self.at_frame and (length is None or index < self.at_frame + length)

    @classmethod
    def parse(cls, spec: str) -> DamageEvent:
        """``KIND@FRAME[,key=value...]``, e.g. ``hot_pixels@200,count=4`` or ``radiation@100,frames=60,level=8000``."""
        head, *rest = spec.split(",")
        kind, sep, frame = head.partition("@")
        if not sep:
            raise ValueError(f"damage {spec!r}: expected KIND@FRAME[,key=value...]")
        fields: dict[str, Any] = {"kind": kind.strip(), "at_frame": frame.strip()}
        for item in rest:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"damage {spec!r}: {item!r} is not key=value")
            fields[key.strip()] = value.strip()
        return cls.model_validate(fields)


def damage_pixels(events: list[DamageEvent], height: int, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each event, the (rows, columns) it damages at (height, width): drawn once from its seed."""
    out = []
    for i, ev in enumerate(events):
        rng = np.random.default_rng([ev.seed, i, height, width])
        if ev.kind in ("hot_column", "dead_column"):
            x = ev.x if ev.x is not None else int(rng.integers(2, max(3, width - 2)))
            x = min(x, width - 1)
            out.append((np.arange(height), np.full(height, x)))
        elif ev.kind == "radiation":
            out.append((np.zeros(0, np.intp), np.zeros(0, np.intp)))
        else:
            n = min(ev.count, max(1, (height - 4) * (width - 4)))
            flat = rng.choice((height - 4) * (width - 4), size=n, replace=False)
            out.append((flat // (width - 4) + 2, flat % (width - 4) + 2))
    return out


def apply_damage(noisy: np.ndarray, index: int, events: list[DamageEvent], where: list[tuple[np.ndarray, np.ndarray]],
                 params: Any, seed: int = 0) -> np.ndarray:
    """Frame ``index`` of a camera (float32 DN, quantised) with the damage active at that frame; ``params``
    the camera's :class:`~cdae.training.defects.DefectParams`. Returns a new array, rounded and clipped."""
    out = np.array(noisy, dtype=np.float32, copy=True)
    if not any(ev.active(index) for ev in events):
        return out
    rng = np.random.default_rng([seed, index, 7])
    bias, adc_max = float(params.bias_dn), float(params.adc_max)
    read_dn = float(params.read_noise_e / params.gain_e_per_dn)
    h, w = out.shape
    for ev, (ys, xs) in zip(events, where):
        if not ev.active(index):
            continue
        v = ev.value
        if ev.kind in ("hot_pixels", "hot_column"):
            out[ys, xs] += np.float32(v * (adc_max - bias))
        elif ev.kind == "stuck_pixels":
            out[ys, xs] = np.float32(round(v * adc_max))
        elif ev.kind in ("dead_pixels", "dead_column"):
            light = out[ys, xs] - np.float32(bias)
            out[ys, xs] = np.float32(bias) + np.float32(v) * light + rng.normal(0, read_dn, ys.size).astype(np.float32)
        else:  # radiation: spots and tracks of deposited charge, as the training simulator draws them
            from cdae.training.defects import _radiation

            idx, electrons = _radiation(rng, params.model_copy(update={"radiation_hits_per_mpx": v}), h, w)
            out.reshape(-1)[idx] += (electrons / params.gain_e_per_dn).astype(np.float32)
    np.rint(out, out=out)
    np.clip(out, 0.0, adc_max, out=out)
    return out


def add_point_sources(signal: np.ndarray, sources: list[tuple[float, float, float]], sigma_px: float) -> np.ndarray:
    """``signal`` with Gaussian spots of ``sigma_px`` at (x, y), each of the given peak (relative intensity)."""
    out = np.array(signal, dtype=np.float32, copy=True)
    h, w = out.shape
    r = int(math.ceil(4 * sigma_px))
    for x, y, peak in sources:
        y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 2)
        x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 2)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(y)
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(x)
        out[y0:y1, x0:x1] += np.float32(peak) * np.exp(-(yy * yy + xx * xx) / np.float32(2 * sigma_px**2))
    return out


class CameraConfig(BaseModel):
    """The simulated camera; ``cdae sim-camera`` flags are a thin layer over it."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field("13SIM1:image1:", min_length=1, description="PV prefix")
    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    max_width: int | None = Field(None, ge=8, le=8192, description="largest SizeX (ArrayData length); default width")
    max_height: int | None = Field(None, ge=8, le=8192)
    rate_hz: float = Field(10.0, gt=0, le=10000, description="frames per second")
    data_type: CameraDataType = Field("UInt16", description="the frames' data type")
    bit_depth: int = Field(12, description="ADC bits of integer frames wider than 8 bits (12 or 16)")
    seed: int = Field(7, ge=0, description="which camera (defect layout) and which scenes")
    bank: int = Field(4, ge=1, le=256, description="frames simulated once per size and cycled")
    acquire: bool = Field(True, description="start acquiring at once")
    static_scene: bool = Field(False, description="every frame shows the same scene; only the noise changes")
    read_noise_e: float | None = Field(None, gt=0, description="read noise (e- RMS) instead of the drawn camera's")
    hot_columns: list[int] = Field(default_factory=list, description="extra hot columns (x indices): later damage")
    hot_column_offset_frac: float = Field(0.01, gt=0, le=1,
                                          description="the hot columns' offset, fraction of the span above bias")
    shutter_open: bool = Field(True, description="start with the shutter open (closed: dark frames)")
    interfaces: list[str] | None = Field(None, description="CA server interfaces (default: caproto's)")
    fresh_noise: bool = Field(False, description="draw new noise (and radiation) for every frame instead of "
                              "cycling the bank's frames (the bank's scenes are still cycled)")
    damage: list[DamageEvent] = Field(default_factory=list, description="run-time damage (opt-in): new hot, dead, "
                                      "stuck pixels, bad columns, radiation bursts from given frames on")
    point_sources: list[tuple[float, float, float]] = Field(
        default_factory=list, description="static point sources (x, y, peak as relative intensity) in every scene")
    point_sigma_px: float = Field(0.7, gt=0.2, le=10, description="the point sources' PSF (Gaussian sigma, px)")

    @model_validator(mode="after")
    def _damage_needs_ints(self) -> CameraConfig:
        if self.damage and self.data_type == "Float32":
            raise ValueError("damage is simulated on integer cameras only (UInt8, Int16, UInt16)")
        return self
    pva: bool = Field(False, description="also serve each frame as an NTNDArray (NDPluginPva-like) on <prefix>Pva1:Image")

    def max_elements(self) -> int:
        return (self.max_width or self.width) * (self.max_height or self.height)


@dataclass(frozen=True)
class BankFrame:
    noisy: np.ndarray  # float32 DN
    clean: np.ndarray  # float32 DN
    signal: np.ndarray | None = None  # the scene (relative intensity), for frames drawn afresh


@dataclass
class CameraModel:
    """One simulated camera at one size: its detector, damage layout and the bank of scenes."""

    params: Any  # cdae.training.defects.DefectParams
    layout: Any  # cdae.training.defects.DefectLayout
    bank: list[BankFrame] = field(default_factory=list)
    dark: bool = False


#: Dark frames draw their noise from indices this far into the camera's detector stream.
DARK_NOISE_INDEX = 1_000_000


def simulate_bank(config: CameraConfig, height: int, width: int, dark: bool = False) -> list[BankFrame]:
    """``config.bank`` frames of one camera (fixed detector and defect layout) at (height, width).

    ``dark``: shutter closed, no light (and so no glints); the clean frame is the bias level.
    """
    return camera_model(config, height, width, dark).bank


def camera_model(config: CameraConfig, height: int, width: int, dark: bool = False) -> CameraModel:
    """The camera (detector, layout) and ``config.bank`` frames of it at (height, width)."""
    from cdae.training.defects import (
        BadLine,
        apply_detector,
        detector_rng,
        sample_defect_layout,
        sample_defect_params,
    )
    from cdae.training.simulate import generate_scene, scene_rng

    seed = config.seed
    rng = detector_rng(seed, 0)
    params = sample_defect_params(rng, None, bit_depth_for(config.data_type, config.bit_depth))
    layout = sample_defect_layout(rng, params, height, width)
    if config.read_noise_e is not None:
        params = params.model_copy(update={"read_noise_e": config.read_noise_e})
    offset = config.hot_column_offset_frac * (params.adc_max - params.bias_dn)
    layout.bad_lines += [BadLine("column", x, 0, height, "hot", offset) for x in config.hot_columns if x < width]
    if dark:
        params = params.model_copy(update={"saturated_blobs": 0})
    out = []
    for i in range(config.bank):
        if dark:
            signal = np.zeros((height, width), np.float32)
        else:
            signal = generate_scene(scene_rng(seed, 0 if config.static_scene else i), height, width).signal
            if config.point_sources:
                signal = add_point_sources(signal, config.point_sources, config.point_sigma_px)
        det = apply_detector(signal, detector_rng(seed, 1 + i + (DARK_NOISE_INDEX if dark else 0)), params, layout)
        out.append(BankFrame(noisy=det.noisy, clean=det.clean, signal=signal))
    return CameraModel(params=params, layout=layout, bank=out, dark=dark)


def camera_frame(model: CameraModel, config: CameraConfig, index: int,
                 where: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """Frame ``index`` (float32 DN) of the camera: the bank's, or with ``fresh_noise`` one drawn afresh
    from the bank's scene; with the damage active at ``index``."""
    b = model.bank[index % len(model.bank)]
    noisy = b.noisy
    if config.fresh_noise:
        from cdae.training.defects import apply_detector, detector_rng

        stream = 1 + config.bank + index + (DARK_NOISE_INDEX if model.dark else 0)
        noisy = apply_detector(b.signal, detector_rng(config.seed, stream), model.params, model.layout).noisy
    if config.damage:
        h, w = noisy.shape
        noisy = apply_damage(noisy, index, config.damage, where or damage_pixels(config.damage, h, w), model.params,
                             config.seed)
    return noisy


def bit_depth_for(data_type: str, bit_depth: int) -> int:
    return 8 if data_type == "UInt8" else bit_depth


class SimCamera:
    """The camera's behaviour behind :class:`~cdae.ioc.pvs.CameraPVs`."""

    def __init__(self, config: CameraConfig) -> None:
        self.config = config
        self.element = ca_element_dtype(NDDataType[config.data_type])
        group_cls = camera_pvs(self.element, config.max_elements())
        self.pvs: CameraPVs = group_cls(prefix=config.prefix)
        self.pvs.controller = self
        self.data_type = NDDataType[config.data_type]
        self.width, self.height = config.width, config.height
        self.bank: list[BankFrame] = []
        self.model: CameraModel | None = None
        self._where: list[tuple[np.ndarray, np.ndarray]] = []
        self.shutter_open = config.shutter_open
        self.served: list[np.ndarray] = []  # bank frames flat in the CA element type
        self.native: list[np.ndarray] = []  # the same frames (height, width) in their own dtype (for PVA)
        self.pva: NTNDArrayServer | None = None
        self.acquiring = asyncio.Event()
        self.period_s = 1.0 / config.rate_hz
        self.counter = 0
        self.unique_id = 0
        self.rate = RateMeter()
        self._resize_lock = asyncio.Lock()

    # putters -----------------------------------------------------------------------------

    async def set_acquire(self, on: bool) -> None:
        (self.acquiring.set if on else self.acquiring.clear)()

    async def set_rate(self, rate_hz: float) -> None:
        self.period_s = 1.0 / rate_hz

    async def set_size(self, width: int, height: int) -> None:
        cap_w, cap_h = self.config.max_width or self.config.width, self.config.max_height or self.config.height
        if not (8 <= width and 8 <= height and width * height <= cap_w * cap_h):
            raise ValueError(f"size {width}x{height}: expected >= 8x8 and at most {cap_w * cap_h} pixels")
        await self._simulate(width, height)

    async def set_shutter(self, open_: bool) -> None:
        if open_ != self.shutter_open:
            self.shutter_open = open_
            await self._simulate(self.width, self.height)

    async def set_data_type(self, name: str) -> None:
        t = NDDataType[name]
        if name not in ("UInt8", "Int16", "UInt16", "Float32") or ca_element_dtype(t) != self.element:
            raise ValueError(f"DataType {name}: this camera serves {self.element} elements; "
                             f"expected a type that travels as {self.element}")
        self.data_type = t
        self._convert()

    # frames ------------------------------------------------------------------------------

    async def _simulate(self, width: int, height: int) -> None:
        async with self._resize_lock:
            c = self.config
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(None, camera_model, c, height, width, not self.shutter_open)
            self.model, self.bank, self.width, self.height = model, model.bank, width, height
            self._where = damage_pixels(c.damage, height, width)
            self._convert()
            await self.pvs.size_x.write(width, verify_value=False)
            await self.pvs.size_y.write(height, verify_value=False)

    def _convert(self) -> None:
        dt = numpy_dtype(self.data_type)
        self.native = [np.asarray(f.noisy).astype(dt) for f in self.bank]
        self.served = [to_ca(f, self.element) for f in self.native]

    @property
    def per_frame(self) -> bool:
        """Frames made one by one (fresh noise or damage) instead of served from the bank."""
        return self.config.fresh_noise or bool(self.config.damage)

    def _frame(self, index: int) -> np.ndarray:
        assert self.model is not None
        noisy = camera_frame(self.model, self.config, index, self._where)
        return to_ca(noisy.astype(numpy_dtype(self.data_type)), self.element)

    async def publish_next(self) -> None:
        i = self.counter % len(self.bank)
        served = self.served[i]
        if self.per_frame:
            served = await asyncio.get_running_loop().run_in_executor(None, self._frame, self.counter)
        self.counter += 1
        self.unique_id += 1
        self.rate.tick()
        info = FrameInfo(unique_id=self.unique_id, stamp=posix_to_epics(time.time()), data_type=self.data_type)
        rate = self.rate.rate_hz()
        await write_image(self.pvs.clean, self.bank[i].clean.reshape(-1), self.height, self.width,
                          NDDataType.Float32, info, self.counter, rate)
        await write_image(self.pvs, served, self.height, self.width, self.data_type, info, self.counter,
                          rate, itemsize=numpy_dtype(self.data_type).itemsize)
        if self.pva is not None:
            self.pva.post(self.config.prefix + IMAGE, self.native[i], self.data_type, info)

    async def acquire_loop(self) -> None:
        next_t = time.monotonic()
        while True:
            await self.acquiring.wait()
            async with self._resize_lock:
                await self.publish_next()
            next_t += self.period_s
            now = time.monotonic()
            if next_t < now - self.period_s:  # fell behind: skip ahead rather than burst
                next_t = now
            await asyncio.sleep(max(0.0, next_t - now))

    async def run(self, stop: asyncio.Event) -> int:
        c = self.config
        await self.pvs.set_data_type.write(c.data_type, verify_value=False)
        await self.pvs.rate.write(c.rate_hz, verify_value=False)
        await self.pvs.rate_rbv.write(c.rate_hz)
        await self.pvs.camera_model.write(f"simulated camera, seed {c.seed}")
        shutter = "Open" if c.shutter_open else "Close"
        await self.pvs.shutter_control.write(shutter, verify_value=False)
        await self.pvs.shutter_control_rbv.write(shutter)
        await self.pvs.shutter_status.write("Open" if c.shutter_open else "Closed")
        await self._simulate(c.width, c.height)
        if c.acquire:
            self.acquiring.set()
        else:
            await self.pvs.acquire.write("Done")
        if c.pva:
            self.pva = NTNDArrayServer([c.prefix + IMAGE], c.interfaces)
        tasks = [asyncio.create_task(serve_pvdb(self.pvs.pvdb, c.interfaces)),
                 asyncio.create_task(self.acquire_loop())]
        say(f"cdae-sim-camera ready prefix={c.prefix} size={c.width}x{c.height} data_type={c.data_type} "
            f"rate_hz={c.rate_hz:g} port={ca_server_port()} pva={self.pva.port if self.pva else 'off'}")
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        await cancel_all([stopper, *tasks])
        if self.pva is not None:
            self.pva.close()
        for t in failed:
            log("cdae-sim-camera", f"stopped on error: {t.exception()!r}")
        log("cdae-sim-camera", f"stopped after {self.counter} frames")
        return 1 if failed else 0


async def run_camera(config: CameraConfig, stop: asyncio.Event) -> int:
    log("cdae-sim-camera", "effective config: " + config.model_dump_json())
    return await SimCamera(config).run(stop)
