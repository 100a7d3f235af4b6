"""A scripted NDStdArrays source for the IOC tests: frames of any data type, colour mode and dimensions on demand.

    python nd_source_child.py PREFIX ELEMENT MAX_ELEMENTS [--no-ndimensions]

``ELEMENT`` is ArrayData's CA element (uint8, int16, int32, float32, float64). Nothing is sent until
the test writes a JSON command to ``PREFIX Cmd`` (a CHAR waveform); the put returns once the frames
are out, each posted as areaDetector's NDStdArrays does (sizes, NDimensions, DataType, ColorMode,
UniqueId, then ArrayData). Command fields: ``uid`` (first UniqueId), ``count`` (frames, 1), ``w``,
``h`` (ArraySize0/1, 64x48), ``d`` (ArraySize2: 0 for a 2-D frame, else NDimensions is 3), ``n``
(elements, default w*h*max(d, 1)), ``dt`` (DataType_RBV name, UInt16), ``cm`` (ColorMode_RBV name,
Mono), ``val`` (pixel level; the pixels are ``val + index % 7``), ``noise`` (Gaussian sigma added),
``sleep`` (seconds between frames). ``--no-ndimensions``: no NDimensions_RBV and ArraySize2_RBV
(older plugins, plain waveforms).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, pvproperty, run
from caproto.server.server import PvpropertyByteRO

from cdae.ioc.frames import COLOR_MODE_NAMES, DATA_TYPE_NAMES

PREFIX, ELEM, MAXN = sys.argv[1], sys.argv[2], int(sys.argv[3])
NO_NDIMENSIONS = "--no-ndimensions" in sys.argv
CHANNEL = {"uint8": PvpropertyByteRO, "int16": ChannelType.INT, "int32": ChannelType.LONG,
           "float32": ChannelType.FLOAT, "float64": ChannelType.DOUBLE}[ELEM]


class Source(PVGroup):
    array_data = pvproperty(name="ArrayData", value=np.zeros(1, dtype=ELEM), dtype=CHANNEL, max_length=MAXN,
                            read_only=True)
    size0 = pvproperty(name="ArraySize0_RBV", value=64)
    size1 = pvproperty(name="ArraySize1_RBV", value=48)
    data_type = pvproperty(name="DataType_RBV", value="UInt16", dtype=ChannelType.ENUM, enum_strings=DATA_TYPE_NAMES)
    color_mode = pvproperty(name="ColorMode_RBV", value="Mono", dtype=ChannelType.ENUM, enum_strings=COLOR_MODE_NAMES)
    unique_id = pvproperty(name="UniqueId_RBV", value=0)
    cmd = pvproperty(name="Cmd", value="", dtype=ChannelType.CHAR, max_length=4096, report_as_string=True)

    @cmd.putter
    async def cmd(self, instance: object, value: object) -> str:
        if not isinstance(value, str):
            value = bytes(bytearray(int(x) for x in value)).split(b"\0")[0].decode()  # type: ignore[union-attr]
        await self.push(json.loads(value))
        return ""

    async def push(self, c: dict) -> None:
        w, h, d = int(c.get("w", 64)), int(c.get("h", 48)), int(c.get("d", 0))
        n = int(c.get("n", w * h * max(d, 1)))
        rng = np.random.default_rng(int(c.get("uid", 0)))
        for k in range(int(c.get("count", 1))):
            ts = time.time()
            await self.size0.write(w, timestamp=ts)
            await self.size1.write(h, timestamp=ts)
            if isinstance(self, SourceND):
                await self.size2.write(d, timestamp=ts)
                await self.ndimensions.write(3 if d else 2, timestamp=ts)
            await self.data_type.write(c.get("dt", "UInt16"), timestamp=ts)
            await self.color_mode.write(c.get("cm", "Mono"), timestamp=ts)
            await self.unique_id.write(int(c.get("uid", 1)) + k, timestamp=ts)
            pixels = np.full(n, float(c.get("val", 1000))) + np.arange(n) % 7
            if c.get("noise"):
                pixels += rng.normal(0.0, float(c["noise"]), n)
            await self.array_data.write(np.round(pixels).astype(ELEM), timestamp=ts)
            if c.get("sleep"):
                await asyncio.sleep(float(c["sleep"]))


class SourceND(Source):
    size2 = pvproperty(name="ArraySize2_RBV", value=0)
    ndimensions = pvproperty(name="NDimensions_RBV", value=2)


if __name__ == "__main__":
    group = (Source if NO_NDIMENSIONS else SourceND)(prefix=PREFIX)
    print(f"cdae-test-ndsource ready prefix={PREFIX} element={ELEM}", flush=True)
    run(group.pvdb, interfaces=["127.0.0.1"], log_pv_names=False)
