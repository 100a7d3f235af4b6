"""The engine's counters and rolling timing windows (``status`` and ``metrics`` on the control channel)."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from pydantic import JsonValue

from cdae.engine.protocol import Timings


class EngineStats:
    """Counters and rolling timing windows, shared by the I/O, worker and control threads."""

    def __init__(self, window: int) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.processed = 0
        self.dropped = 0
        self.errors = 0
        self.errors_by_code: dict[str, int] = {}
        self.tiled_frames = 0
        self.by_model: dict[str, int] = {}
        self._timings: dict[str, deque[float]] = {k: deque(maxlen=window) for k in ("queue_ms", "inference_ms", "total_ms")}
        self._done_at: deque[float] = deque(maxlen=window)
        self.started = time.monotonic()

    def count_received(self) -> None:
        with self._lock:
            self.received += 1

    def count_dropped(self) -> None:
        with self._lock:
            self.dropped += 1

    def count_error(self, code: str) -> None:
        with self._lock:
            self.errors += 1
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1

    def count_processed(self, timings: Timings, model: str, tiles: int) -> None:
        with self._lock:
            self.processed += 1
            self.by_model[model] = self.by_model.get(model, 0) + 1
            if tiles > 1:
                self.tiled_frames += 1
            for k, q in self._timings.items():
                q.append(getattr(timings, k))
            self._done_at.append(time.monotonic())

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"received": self.received, "processed": self.processed, "dropped": self.dropped,
                    "errors": self.errors}

    def timings(self, percentiles: tuple[float, ...] = (50, 99)) -> dict[str, dict[str, float | None]]:
        with self._lock:
            data = {k: np.asarray(q, dtype=np.float64) for k, q in self._timings.items()}
        out: dict[str, dict[str, float | None]] = {}
        for k, a in data.items():
            out[k] = {f"p{p:g}": (round(float(np.percentile(a, p)), 3) if a.size else None) for p in percentiles}
        return out

    def metrics(self) -> dict[str, JsonValue]:
        with self._lock:
            done = list(self._done_at)
            rate = (len(done) - 1) / (done[-1] - done[0]) if len(done) >= 2 and done[-1] > done[0] else 0.0
            extra = {"errors_by_code": dict(self.errors_by_code), "tiled_frames": self.tiled_frames,
                     "processed_by_model": dict(self.by_model)}
        timings = self.timings((50, 90, 99, 100))
        return {"counters": self.counters(), **extra, "rate_hz": round(rate, 3),  # type: ignore[dict-item]
                "timings_ms": timings, "uptime_s": round(time.monotonic() - self.started, 3)}  # type: ignore[dict-item]
