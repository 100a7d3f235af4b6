"""The filter IOC's flow control, sans-I/O: which frame goes to the engine, when, and where every frame went.

:class:`FlowControl` owns the rules and the state; :class:`~cdae.ioc.filter.FilterIOC` keeps only the
asyncio around it (it waits on a condition when this says "not now", runs one task per frame) and
calls it. Nothing here awaits, sleeps or touches a socket, so tests drive every sequence directly,
as caproto drives its protocol state machines.

One frame's way through: ``offer`` puts it in the newest-wins slot (the frame it replaces is dropped,
``replaced``) → the dispatcher reserves a place in the window (``reserve``: at most ``queue_size`` places
held) and takes the newest frame into it (``take``), which gives the frame its sequence number → the
frame settles once (``settle``: published, an error, or a drop by cause) → its place is released
(``release``). The books balance at every step: ``received == published + dropped + errors +
pending``, where pending is the frame in the slot and the frames taken and not yet settled (``check``).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from cdae.ioc.frames import FrameBooks, LatestSlot

T = TypeVar("T")

#: How a frame taken for the engine ends: published, an error, or dropped by one of these causes
#: (``replaced`` and ``disabled`` befall frames still in the slot, never one taken).
OUTCOMES: tuple[str, ...] = ("published", "error", "engine_queue", "overtaken", "engine_lost")


class FlowError(RuntimeError):
    """A step the flow's rules do not allow (a bug in the caller, never a frame's fault)."""


class FlowControl(Generic[T]):
    """The in-flight window, the newest-wins slot, the order of replies and the books, with no I/O.

    The window counts places, not frames: the dispatcher reserves a place before it waits for a
    frame, so a reserved place with no frame yet counts as in flight (``QueueFree`` says so).
    Shrinking ``queue_size`` below what is in flight cancels nothing: no place is reserved until
    enough frames have settled. When the engine is lost the caller cancels the frames' tasks and
    each settles as ``engine_lost``; the slot is kept, so the newest frame waits for the engine (and
    newer ones replace it, ``replaced``). With several engines replies can come back out of order:
    a reply older than one already published is dropped as ``overtaken``.
    """

    def __init__(self, queue_size: int) -> None:
        self.books = FrameBooks()
        self.queue_size = 0
        self.set_queue_size(queue_size)
        self.enabled = True
        self.seq = 0  # the last sequence number given to a frame taken from the slot
        self.last_published_seq = 0  # the newest frame whose reply went to be published
        self.reserved = 0  # places held by the dispatcher with no frame in them yet
        self.faults = 0  # errors counted that are no frame's (the source's own, e.g. an unknown DataType)
        self._slot: LatestSlot[T] = LatestSlot()
        self._unsettled: set[int] = set()  # taken, not yet settled: pending in the books
        self._holding: set[int] = set()  # taken, place not yet released: in flight
        self._in_engine: set[int] = set()  # sent to the engine, reply not yet in

    # --- the window ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Places held: reserved by the dispatcher, or holding a frame not yet released."""
        return self.reserved + len(self._holding)

    @property
    def queue_free(self) -> int:
        """``QueueFree``: places left in the window (0 while a shrunk window is still over-full)."""
        return max(0, self.queue_size - self.in_flight)

    @property
    def in_engine(self) -> int:
        """Frames sent to the engine whose reply is not in: the engine is still answering while any are."""
        return len(self._in_engine)

    @property
    def pending(self) -> int:
        """Frames received and not yet accounted for: the one in the slot and those taken, not settled."""
        return (1 if self._slot else 0) + len(self._unsettled)

    def set_queue_size(self, size: int) -> None:
        """``QueueSize`` at run time; a smaller window only stops new reservations."""
        if size < 1:
            raise ValueError(f"queue size {size}: at least one frame must be able to be in flight")
        self.queue_size = size

    def may_reserve(self) -> bool:
        """Whether the window has a place free now."""
        return self.in_flight < self.queue_size

    def reserve(self) -> None:
        """Hold a place in the window for the next frame taken."""
        if not self.may_reserve():
            raise FlowError(f"the window is full: {self.in_flight} of {self.queue_size} places held")
        self.reserved += 1

    def unreserve(self) -> None:
        """Give back a reserved place that no frame went into (nothing to take, or the dispatcher stopped)."""
        if self.reserved < 1:
            raise FlowError("no place is reserved")
        self.reserved -= 1

    # --- the source side -----------------------------------------------------------------------

    def offer(self, item: T) -> T | None:
        """A frame from the source into the newest-wins slot: received; the frame it replaced (dropped,
        ``replaced``) or None. While disabled nothing is received and nothing counted."""
        if not self.enabled:
            return None
        self.books.received += 1
        old = self._slot.put(item)
        if old is not None:
            self.books.drop("replaced")
        return old

    def refuse(self) -> None:
        """A frame from the source that never reaches the slot (it cannot be assembled, or is larger than
        the output PVs): received and an error. While disabled nothing is counted."""
        if not self.enabled:
            return
        self.books.received += 1
        self.books.errors += 1

    def fault(self) -> None:
        """An error the source reports outside any frame: counted in the errors, outside the balance."""
        self.books.errors += 1
        self.faults += 1

    def set_enabled(self, enabled: bool) -> bool:
        """``EnableCallbacks``; disabling drops the frame waiting in the slot (``disabled``): True when one was.
        Frames already taken go on to the engine and settle as usual."""
        self.enabled = enabled
        if not enabled and self._slot.take() is not None:
            self.books.drop("disabled")
            return True
        return False

    # --- the engine side -----------------------------------------------------------------------

    def may_take(self) -> bool:
        """Whether a frame can be taken now: a place is reserved and a frame waits."""
        return self.reserved > 0 and bool(self._slot)

    def take(self) -> tuple[int, T] | None:
        """The newest frame into the reserved place, with its sequence number; None (the place stays
        reserved) when the slot is empty."""
        if self.reserved < 1:
            raise FlowError("take without a reserved place")
        item = self._slot.take()
        if item is None:
            return None
        self.reserved -= 1
        self.seq += 1
        self._unsettled.add(self.seq)
        self._holding.add(self.seq)
        return self.seq, item

    def sent(self, seq: int) -> None:
        """Frame ``seq`` went to the engine."""
        if seq not in self._unsettled:
            raise FlowError(f"frame {seq} is not in flight")
        self._in_engine.add(seq)

    def answered(self, seq: int) -> None:
        """The engine's answer to frame ``seq`` is in (a reply, a timeout, or the wait given up)."""
        self._in_engine.discard(seq)

    def claim(self, seq: int) -> bool:
        """The engine's reply to frame ``seq`` is in: True when no newer frame went to be published first
        (``seq`` is now the newest, the caller publishes it and settles it); False when one did: the frame
        is settled, ``overtaken``."""
        if seq not in self._unsettled:
            raise FlowError(f"frame {seq} is not in flight")
        if seq <= self.last_published_seq:
            self.settle(seq, "overtaken")
            return False
        self.last_published_seq = seq
        return True

    def settle(self, seq: int, outcome: str) -> bool:
        """Where frame ``seq`` went (one of :data:`OUTCOMES`), counted once: True when this call counted it,
        False when it was settled already (the catch-all after a cancelled frame counts nothing twice)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
        if seq not in self._unsettled:
            if seq in self._holding:
                return False
            raise FlowError(f"frame {seq} is not in flight")
        self._unsettled.discard(seq)
        if outcome == "published":
            self.books.published += 1
        elif outcome == "error":
            self.books.errors += 1
        else:
            self.books.drop(outcome)
        return True

    def release(self, seq: int) -> None:
        """Frame ``seq``'s place back to the window; the frame must be settled first."""
        if seq in self._unsettled:
            raise FlowError(f"frame {seq} released before it was settled")
        if seq not in self._holding:
            raise FlowError(f"frame {seq} holds no place")
        self._holding.discard(seq)
        self._in_engine.discard(seq)

    def holds(self, seq: int) -> bool:
        """Whether frame ``seq`` still holds a place (taken and not yet released)."""
        return seq in self._holding

    # --- the books -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`FlowError` unless every frame received is accounted for."""
        b = self.books
        accounted = b.published + b.dropped + (b.errors - self.faults) + self.pending
        if b.received != accounted:
            raise FlowError(f"the books do not balance: received {b.received}, but published {b.published} + "
                            f"dropped {b.dropped} + errors {b.errors - self.faults} + pending {self.pending} "
                            f"= {accounted}")
        if self.reserved < 0 or not self._unsettled <= self._holding or not self._in_engine <= self._holding:
            raise FlowError("the window's places and the frames in flight disagree")
