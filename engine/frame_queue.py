"""The engine's bounded pending frames: per-client slots where the newest frame wins, served round-robin.

Nothing here blocks the producer (the server's I/O thread) or grows without bound: at most ``per_client``
frames per client, ``max_clients`` clients and ``max_bytes`` of frames wait; what does not fit is handed
back to the caller to answer ``dropped``.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FrameQueue(Generic[T]):
    """Bounded per-client pending frames, served round-robin; when a client's slot is full the newest wins.

    ``put`` returns the items it pushed out (the caller answers them "dropped"); nothing ever
    blocks the producer, at most ``per_client * max_clients`` items wait, and at most ``max_bytes``
    of them (the ``nbytes`` each was put with): a frame that would go beyond is refused.
    """

    def __init__(self, per_client: int, max_clients: int, max_bytes: int | None = None) -> None:
        self.per_client = per_client
        self.max_clients = max_clients
        self.max_bytes = max_bytes
        self._slots: dict[bytes, deque[tuple[T, int]]] = {}
        self._order: deque[bytes] = deque()  # clients with frames waiting, in service order
        self._cond = threading.Condition()
        self._depth = 0
        self._bytes = 0
        self.high_water = 0
        self.bytes_high_water = 0
        self.refused_for = ""  # why put last refused its own item: "clients" or "bytes"

    def put(self, client: bytes, item: T, nbytes: int = 0) -> list[T]:
        with self._cond:
            slot = self._slots.get(client)
            own = sum(size for _, size in slot) if slot else 0
            if self.max_bytes is not None and self._bytes - own + nbytes > self.max_bytes:
                self.refused_for = "bytes"  # even without this client's older frames it would not fit
                return [item]
            if slot is None:
                if len(self._slots) >= self.max_clients:
                    self.refused_for = "clients"
                    return [item]  # too many clients waiting: refuse rather than grow
                slot = self._slots[client] = deque()
                self._order.append(client)
            evicted = []
            while len(slot) >= self.per_client or (self.max_bytes is not None and self._bytes + nbytes > self.max_bytes):
                old, size = slot.popleft()  # the client's own older frames make room: the newest wins
                evicted.append(old)
                self._depth -= 1
                self._bytes -= size
            slot.append((item, nbytes))
            self._depth += 1
            self._bytes += nbytes
            self.high_water = max(self.high_water, self._depth)
            self.bytes_high_water = max(self.bytes_high_water, self._bytes)
            self._cond.notify()
            return evicted

    def get(self, timeout: float | None = None) -> T | None:
        with self._cond:
            if not self._order and not self._cond.wait_for(lambda: bool(self._order), timeout):
                return None
            client = self._order.popleft()
            slot = self._slots[client]
            item, size = slot.popleft()
            self._depth -= 1
            self._bytes -= size
            if slot:
                self._order.append(client)  # round robin: this client goes to the back
            else:
                del self._slots[client]
            return item

    def drain(self) -> list[T]:
        with self._cond:
            items = [i for s in self._slots.values() for i, _ in s]
            self._slots.clear()
            self._order.clear()
            self._depth = 0
            self._bytes = 0
            return items

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._depth
