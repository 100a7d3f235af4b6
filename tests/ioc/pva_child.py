"""p4p in a child process of the PVA tests: the pytest process itself loads no PVA library.

pytest's process already holds pyepics' libca and caproto; p4p brings EPICS base again (epicscorelibs),
and a process holding both aborted at exit after the whole suite (glibc heap check), so the tests run
p4p here and read its findings as JSON lines on stdout:

    python pva_child.py monitor NAME        one line per update of an NTNDArray channel, until killed
    python pva_child.py get NAME [NAME...]  one line per channel, then exit
    python pva_child.py camera NAME         an NTNDArray camera on NAME: a good 32x24 UInt16 frame every
                                            0.2 s; stdin "pause", "resume", "bad KIND" (see BAD)
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time

import numpy as np

from cdae.ioc.frames import EPICS_EPOCH_OFFSET_S, FrameInfo, NDDataType
from cdae.ioc.pva import ntndarray_fields

BAD = {  # what a broken camera sends, by the reason the IOC must give
    "size": {"value": ("ushortValue", np.zeros(5, np.uint16))},
    "colour": {"attribute": [{"name": "ColorMode", "value": 2}]},
    "type": {"value": ("floatValue", np.zeros(32 * 24, np.float32)), "codec": {"name": "", "parameters": 8}},
    "codec": {"codec": {"name": "lz4", "parameters": 3}},
}


def pixels_sha1(pixels: np.ndarray) -> str:
    """What the tests compare frames by (the pixels' bytes, little-endian, in their own dtype)."""
    return hashlib.sha1(np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()).hexdigest()


def describe(v: object) -> dict | None:
    if isinstance(v, Exception) or v["value"] is None:  # type: ignore[index]
        return None
    pixels = np.asarray(v["value"])  # type: ignore[index]
    stamp = lambda ts: [int(ts["secondsPastEpoch"]), int(ts["nanoseconds"])]  # noqa: E731
    return {"uid": int(v["uniqueId"]), "ts": stamp(v["timeStamp"]), "dts": stamp(v["dataTimeStamp"]),  # type: ignore[index]
            "dtype": pixels.dtype.name, "n": int(pixels.size), "sha1": pixels_sha1(pixels),
            "dims": [[d["size"], d["offset"], d["binning"], bool(d["reverse"])] for d in v["dimension"]],  # type: ignore[index]
            "attrs": {a["name"]: a["value"] for a in v["attribute"]},  # type: ignore[index]
            "codec": [v["codec"]["name"], v["codec"]["parameters"]],  # type: ignore[index]
            "sizes": [v["compressedSize"], v["uncompressedSize"]], "severity": v["alarm"]["severity"]}  # type: ignore[index]


def emit(d: dict | None) -> None:
    if d is not None:
        print(json.dumps(d), flush=True)


def camera(name: str) -> None:
    from p4p import Value
    from p4p.nt import NTNDArray
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    n = [0]

    def frame(**override: object) -> object:
        n[0] += 1
        info = FrameInfo(unique_id=n[0], stamp=(int(time.time()) - EPICS_EPOCH_OFFSET_S, 0), data_type=NDDataType.UInt16)
        fields = ntndarray_fields(np.full((24, 32), 100, np.uint16), NDDataType.UInt16, info)
        return Value(NTNDArray.buildType(), {**fields, **override})

    pv = SharedPV(initial=frame())
    server = Server(providers=[{name: pv}])
    paused = threading.Event()
    stop = threading.Event()

    def stream() -> None:
        while not stop.wait(0.2):
            if not paused.is_set():
                pv.post(frame())

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "pause":
            paused.set()
        elif cmd == "resume":
            paused.clear()
        elif cmd == "bad":
            pv.post(frame(**BAD[arg]))
        print("ok", cmd, flush=True)
    stop.set()
    t.join(5)
    server.stop()


def main(argv: list[str]) -> int:
    mode, names = argv[0], argv[1:]
    if mode == "camera":
        camera(names[0])
        return 0
    from p4p.client.thread import Context

    with Context("pva", nt=False) as ctx:
        if mode == "get":
            for name in names:
                emit({"name": name, **(describe(ctx.get(name, timeout=10.0)) or {})})
            return 0
        sub = ctx.monitor(names[0], lambda v: emit(describe(v)), notify_disconnect=True)
        try:
            sys.stdin.read()  # until the test closes stdin (or kills this process)
        finally:
            sub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
