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

With ``pva`` the camera also serves each frame as an NTNDArray over PV Access, as areaDetector's
NDPluginPva does, on ``<prefix>Pva1:Image`` (p4p; ``cdae ioc --source pva://<prefix>Pva1:`` reads it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cdae.ioc.frames import FrameInfo, NDDataType, RateMeter, ca_element_dtype, numpy_dtype, posix_to_epics, to_ca
from cdae.ioc.publish import write_image
from cdae.ioc.pva import IMAGE, NTNDArrayServer
from cdae.ioc.pvs import CameraPVs, camera_pvs
from cdae.ioc.runner import ca_server_port, cancel_all, log, serve_pvdb

CameraDataType = Literal["UInt8", "Int16", "UInt16", "Float32"]


class CameraConfig(BaseModel):
    """The simulated camera; ``cdae sim-camera`` flags are a thin layer over it."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field("13SIM1:image1:", min_length=1, description="PV prefix")
    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    max_width: int | None = Field(None, ge=8, le=8192, description="largest SizeX (ArrayData length); default width")
    max_height: int | None = Field(None, ge=8, le=8192)
    rate_hz: float = Field(10.0, gt=0, le=10000)
    data_type: CameraDataType = "UInt16"
    bit_depth: int = Field(12, description="ADC bits of integer frames wider than 8 bits (12 or 16)")
    seed: int = Field(7, ge=0, description="which camera (defect layout) and which scenes")
    bank: int = Field(4, ge=1, le=256, description="frames simulated once per size and cycled")
    acquire: bool = Field(True, description="start acquiring at once")
    static_scene: bool = Field(False, description="every frame shows the same scene; only the noise changes")
    read_noise_e: float | None = Field(None, gt=0, description="read noise (e- RMS) instead of the drawn camera's")
    hot_columns: list[int] = Field(default_factory=list, description="extra hot columns (x indices): later damage")
    hot_column_offset_frac: float = Field(0.01, gt=0, le=1, description="their offset, fraction of the span above bias")
    shutter_open: bool = Field(True, description="start with the shutter open (closed: dark frames)")
    interfaces: list[str] | None = Field(None, description="CA server interfaces (default: caproto's)")
    pva: bool = Field(False, description="also serve each frame as an NTNDArray (NDPluginPva-like) on <prefix>Pva1:Image")

    def max_elements(self) -> int:
        return (self.max_width or self.width) * (self.max_height or self.height)


@dataclass(frozen=True)
class BankFrame:
    noisy: np.ndarray  # float32 DN
    clean: np.ndarray  # float32 DN


#: Dark frames draw their noise from indices this far into the camera's detector stream.
DARK_NOISE_INDEX = 1_000_000


def simulate_bank(config: CameraConfig, height: int, width: int, dark: bool = False) -> list[BankFrame]:
    """``config.bank`` frames of one camera (fixed detector and defect layout) at (height, width).

    ``dark``: shutter closed, no light (and so no glints); the clean frame is the bias level.
    """
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
        det = apply_detector(signal, detector_rng(seed, 1 + i + (DARK_NOISE_INDEX if dark else 0)), params, layout)
        out.append(BankFrame(noisy=det.noisy, clean=det.clean))
    return out


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
            bank = await loop.run_in_executor(None, simulate_bank, c, height, width, not self.shutter_open)
            self.bank, self.width, self.height = bank, width, height
            self._convert()
            await self.pvs.size_x.write(width, verify_value=False)
            await self.pvs.size_y.write(height, verify_value=False)

    def _convert(self) -> None:
        dt = numpy_dtype(self.data_type)
        self.native = [np.asarray(f.noisy).astype(dt) for f in self.bank]
        self.served = [to_ca(f, self.element) for f in self.native]

    async def publish_next(self) -> None:
        i = self.counter % len(self.bank)
        self.counter += 1
        self.unique_id += 1
        self.rate.tick()
        info = FrameInfo(unique_id=self.unique_id, stamp=posix_to_epics(time.time()), data_type=self.data_type)
        rate = self.rate.rate_hz()
        await write_image(self.pvs.clean, self.bank[i].clean.reshape(-1), self.height, self.width,
                          NDDataType.Float32, info, self.counter, rate)
        await write_image(self.pvs, self.served[i], self.height, self.width, self.data_type, info, self.counter,
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
        print(f"cdae-sim-camera ready prefix={c.prefix} size={c.width}x{c.height} data_type={c.data_type} "
              f"rate_hz={c.rate_hz:g} port={ca_server_port()} pva={self.pva.port if self.pva else 'off'}", flush=True)
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
