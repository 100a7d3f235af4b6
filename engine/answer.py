"""One decoded frame request → its reply parts: what every server of cdae's frame path runs per frame.

The ZeroMQ engine (:mod:`cdae.engine.server`) and the Triton Python-backend model
(:mod:`cdae.engine.triton_model`) both call :func:`answer_frame`, so a frame denoised behind
Triton is the same bytes as one denoised by cdae's own engine: same pipeline, same guard, same
bad-pixel fill, same reply encoding. Pure: no sockets, no threads, no counters (``on_error`` and
the returned :class:`Answer` say what happened; the caller counts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cdae.engine.backends import Backend
from cdae.engine.badpixels import BadPixelMap
from cdae.engine.guard import GuardConfig
from cdae.engine.normalise import NormalisationError
from cdae.engine.pipeline import FrameResult, denoise_frame
from cdae.engine.protocol import ErrorCode, FrameRequest, Timings, error_reply, ok_reply


def model_matches(requested: str, active: str) -> bool:
    """A frame's ``model`` (NAME or NAME:VERSION) against the serving NAME:VERSION."""
    return requested == active or (":" not in requested and active.split(":", 1)[0] == requested)


@dataclass(frozen=True)
class Answer:
    """A reply, ready to send, and what it was: ``result`` for a denoised frame, ``error`` (its code) otherwise."""

    parts: list[bytes | memoryview]
    timings: Timings
    result: FrameResult | None = None
    error: ErrorCode | None = None
    message: str | None = None


def answer_frame(request: FrameRequest, *, ref: str, backend: Backend, guard: GuardConfig | None,
                 bad_pixels: Callable[[str], BadPixelMap | None], received: float, started: float | None = None,
                 max_pixels: int = 4096 * 4096, margin: int | None = None,
                 unknown_map_hint: str = "send it again with set_bad_pixels") -> Answer:
    """Denoise one request with the model ``ref`` on ``backend``; every failure is an error reply, never raised.

    ``bad_pixels``: the map for an id the request names (None: not held); ``received``/``started``:
    perf_counter times of arrival and of the start of work (for the reply's timings).
    """
    started = time.perf_counter() if started is None else started
    h = request.header
    label = {"model": ref, "backend": backend.name}

    def fail(code: ErrorCode, message: str) -> Answer:
        timings = Timings(queue_ms=(started - received) * 1e3, total_ms=(time.perf_counter() - received) * 1e3)
        return Answer(error_reply(code, message, frame_id=h.frame_id, unique_id=h.unique_id, timestamp=h.timestamp,
                                  timings=timings, **label), timings, error=code, message=message)

    if h.model and not model_matches(h.model, ref):
        return fail("model_mismatch", f"frame asks for model {h.model}, the engine serves {ref}")
    bad = None
    if h.bad_pixels is not None:
        bad = bad_pixels(h.bad_pixels)
        if bad is None:
            return fail("unknown_bad_pixels", f"this engine holds no bad-pixel map {h.bad_pixels} (restarted, or "
                                              f"the map was evicted): {unknown_map_hint}")
    try:
        result = denoise_frame(request.frame, backend, bit_depth=h.bit_depth, max_pixels=max_pixels, margin=margin,
                               want_residual=h.flags.want_residual, bad_pixels=bad, guard_config=guard)
    except NormalisationError as e:
        return fail("bad_frame", str(e))
    except Exception as e:  # noqa: BLE001 - the service keeps serving; the error goes back to the client
        return fail("inference_failed", f"{type(e).__name__}: {e}")
    timings = Timings(queue_ms=(started - received) * 1e3, inference_ms=result.inference_ms,
                      total_ms=(time.perf_counter() - received) * 1e3)
    parts = ok_reply(h, denoised=result.denoised, residual=result.residual, defect_map=result.defect_probability,
                     flags=result.flags, flag_counts=result.flag_counts, timings=timings, tiles=result.tiles, **label)
    return Answer(parts, timings, result=result)
