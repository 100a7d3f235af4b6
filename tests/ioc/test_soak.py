"""Soak the image path (slow, not in `make test`): large frames at a high rate for minutes, drops counted.

caproto's server queues a bounded number of updates per subscriber and drops old ones under load;
this runs the pass-through engine so that the IOC and CA, not the model, are what is loaded.
``CDAE_SOAK_S`` sets the duration (default 120 s).
"""

from __future__ import annotations

import os
import time

import pytest

from ioc_helpers import Stack, value_of, wait_for  # type: ignore[import-not-found]


@pytest.mark.slow
def test_soak_image_path(stack: Stack) -> None:
    from caproto.threading.client import Context

    seconds = float(os.environ.get("CDAE_SOAK_S", "120"))
    eng = stack.engine("--backend", "passthrough")
    stack.camera(size="512x512", rate=20)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: int(value_of(out + "ArrayCounter_RBV")) > 5, 120, "frames")  # type: ignore[arg-type]
    ctx = Context()
    received = [0]
    try:
        (arr,) = ctx.get_pvs(out + "ArrayData", timeout=10)
        arr.wait_for_connection(timeout=10)
        sub = arr.subscribe(data_type="time", data_count=0)

        def cb(sub: object, r: object) -> None:
            received[0] += 1

        sub.add_callback(cb)
        start_out = int(value_of(out + "ArrayCounter_RBV"))  # type: ignore[arg-type]
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(5)
            assert all(c.proc is not None and c.proc.poll() is None for c in stack.children), "a process died"
        published = int(value_of(out + "ArrayCounter_RBV")) - start_out  # type: ignore[arg-type]
        sub.clear()
    finally:
        ctx.disconnect()
    dropped = int(value_of(out + "DroppedArrays_RBV"))  # type: ignore[arg-type]
    print(f"soak {seconds:g} s: published {published}, received by a client {received[0]}, "
          f"IOC drops {dropped}")
    assert published > 0.5 * 20 * seconds and received[0] > 0.5 * published
