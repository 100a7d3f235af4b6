"""The IOC's flow control, sans-I/O (cdae.ioc.flow): driven step by step, no processes (the last test drives
the IOC's frame-task done-callback in an event loop).

Every step is followed by the books' check: received == published + dropped + errors + pending.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdae.ioc.flow import OUTCOMES, FlowControl, FlowError


class Checked:
    """A FlowControl whose every call is followed by the balance check."""

    def __init__(self, queue_size: int = 2) -> None:
        self.flow: FlowControl[str] = FlowControl(queue_size)

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.flow, name)
        if not callable(attr):
            return attr

        def call(*args: object) -> object:
            result = attr(*args)
            self.flow.check()
            return result
        return call


def causes(flow: FlowControl[str]) -> dict[str, int]:
    return {k: v for k, v in flow.books.drops.items() if v}


def test_newest_wins_and_the_replaced_frame_is_counted() -> None:
    f = Checked()
    assert f.offer("a") is None
    assert f.offer("b") == "a"
    assert f.offer("c") == "b"
    assert causes(f.flow) == {"replaced": 2} and f.pending == 1
    f.reserve()
    assert f.take() == (1, "c")  # the newest, with the first sequence number
    with pytest.raises(FlowError, match="without a reserved place"):
        f.flow.take()


def test_take_with_an_empty_slot_keeps_the_place() -> None:
    f = Checked(queue_size=1)
    f.reserve()
    assert not f.may_take() and f.take() is None
    assert f.reserved == 1 and f.in_flight == 1 and f.queue_free == 0  # the reserved place counts (QueueFree)
    f.offer("a")
    assert f.may_take() and f.take() == (1, "a")
    assert f.reserved == 0 and f.in_flight == 1


def test_the_window_bounds_what_is_in_flight() -> None:
    f = Checked(queue_size=2)
    taken = []
    for name in "ab":
        f.reserve()
        f.offer(name)
        taken.append(f.take())
    assert taken == [(1, "a"), (2, "b")]
    assert not f.may_reserve() and f.queue_free == 0
    with pytest.raises(FlowError, match="window is full"):
        f.flow.reserve()
    f.offer("c")  # waits in the slot while the window is full
    f.settle(1, "published")
    assert not f.may_reserve()  # settled is not released: the place is held until the task is done
    f.release(1)
    assert f.may_reserve()
    f.reserve()
    assert f.take() == (3, "c")
    assert (f.books.published, f.pending) == (1, 2)


def test_a_frame_settles_once_and_is_released_only_when_settled() -> None:
    f = Checked()
    f.reserve()
    f.offer("a")
    seq, _ = f.take()
    with pytest.raises(FlowError, match="before it was settled"):
        f.flow.release(seq)
    assert f.settle(seq, "error") is True
    assert f.settle(seq, "engine_lost") is False  # the catch-all after the fact counts nothing
    assert (f.books.errors, f.books.dropped) == (1, 0)
    f.release(seq)
    with pytest.raises(FlowError, match="not in flight"):
        f.flow.settle(seq, "published")
    with pytest.raises(FlowError, match="holds no place"):
        f.flow.release(seq)
    with pytest.raises(ValueError, match="unknown outcome"):
        f.flow.settle(seq, "replaced")


def test_overtaken_replies_out_of_order() -> None:
    """Several engines: frames 1..3 out together, replies in the order 2, 1, 3."""
    f = Checked(queue_size=3)
    for name in "abc":
        f.reserve()
        f.offer(name)
        f.take()
    assert f.claim(2) is True  # published first
    f.settle(2, "published")
    assert f.claim(1) is False  # older than one already published: dropped, counted
    assert f.settle(1, "engine_lost") is False
    assert f.claim(3) is True
    f.settle(3, "error")  # a claimed frame that fails to publish still overtakes older ones
    assert causes(f.flow) == {"overtaken": 1}
    assert (f.books.published, f.books.errors, f.pending) == (1, 1, 0)


def test_a_claimed_frame_overtakes_an_older_one_still_publishing() -> None:
    f = Checked(queue_size=2)
    for name in "ab":
        f.reserve()
        f.offer(name)
        f.take()
    assert f.claim(2)  # frame 2 is being published (its PV writes await) ...
    assert not f.claim(1)  # ... when frame 1's reply comes in
    f.settle(2, "published")
    assert causes(f.flow) == {"overtaken": 1}


def test_engine_loss_with_frames_in_flight_and_one_waiting() -> None:
    """The engine is lost: the frames out settle as engine_lost (their tasks are cancelled, the
    catch-all counts them), the one that timed out first is counted once; the slot is kept."""
    f = Checked(queue_size=4)
    for name in "abc":
        f.reserve()
        f.offer(name)
        seq, _ = f.take()
        f.sent(seq)
    f.reserve()  # the dispatcher waits for the next frame (and the engine)
    f.offer("d")
    assert f.in_engine == 3
    assert f.settle(1, "engine_lost")  # frame 1 timed out: the engine is declared lost
    for seq in (1, 2, 3):  # every task ends: its wait given up, the catch-all, its place back
        f.answered(seq)
        f.settle(seq, "engine_lost")
        f.release(seq)
    assert causes(f.flow) == {"engine_lost": 3} and f.in_engine == 0
    assert f.pending == 1 and f.in_flight == 1  # "d" waits; the dispatcher's place is still reserved
    f.offer("e")  # the engine is still down: newer frames replace it
    assert causes(f.flow) == {"engine_lost": 3, "replaced": 1}
    assert f.take() == (4, "e")  # the engine is back (or not: the dispatcher then settles it engine_lost)
    f.settle(4, "engine_lost")
    f.release(4)
    assert f.pending == 0 and f.in_flight == 0


def test_answered_before_settled_and_in_engine_until_then() -> None:
    f = Checked()
    f.reserve()
    f.offer("a")
    f.take()
    with pytest.raises(FlowError, match="not in flight"):
        f.flow.sent(2)
    f.sent(1)
    f.settle(1, "engine_lost")  # settled while the wait for the reply is still being given up
    assert f.in_engine == 1  # the monitor still sees the engine answering until the wait ends
    f.answered(1)
    assert f.in_engine == 0


def test_queue_size_shrinks_below_what_is_in_flight_and_grows() -> None:
    f = Checked(queue_size=4)
    for name in "abcd":
        f.reserve()
        f.offer(name)
        f.take()
    f.set_queue_size(1)
    assert f.in_flight == 4 and f.queue_free == 0 and not f.may_reserve()  # nothing is cancelled
    for seq in (1, 2, 3):
        f.settle(seq, "published")
        f.release(seq)
        assert not f.may_reserve()  # still at the new limit
    f.settle(4, "published")
    f.release(4)
    assert f.may_reserve() and f.queue_free == 1
    f.reserve()
    assert not f.may_reserve()
    f.set_queue_size(3)
    assert f.may_reserve() and f.queue_free == 2
    with pytest.raises(ValueError, match="at least one"):
        f.flow.set_queue_size(0)
    with pytest.raises(ValueError, match="at least one"):
        FlowControl(0)


def test_disable_drops_the_waiting_frame_and_receives_nothing() -> None:
    f = Checked()
    f.reserve()
    f.offer("a")
    f.take()  # frame 1 is out
    f.offer("b")
    assert f.set_enabled(False) is True  # "b" waited: dropped
    assert causes(f.flow) == {"disabled": 1}
    assert f.offer("c") is None and f.flow.refuse() is None  # not received, not counted
    assert f.books.received == 2
    assert f.set_enabled(False) is False  # nothing waits
    f.settle(1, "published")  # the frame already out goes on as usual
    f.release(1)
    assert f.set_enabled(True) is False
    f.offer("d")
    f.refuse()
    assert (f.books.received, f.books.errors, f.pending) == (4, 1, 1)


def test_refused_frames_and_source_faults() -> None:
    f = Checked()
    f.refuse()  # cannot be assembled, or larger than the output PVs: received, an error
    assert (f.books.received, f.books.errors) == (1, 1)
    f.fault()  # the source's own error, no frame: counted in the errors, outside the balance
    assert (f.books.received, f.books.errors, f.faults) == (1, 2, 1)


def test_the_check_catches_a_frame_lost_from_the_books() -> None:
    flow: FlowControl[str] = FlowControl(2)
    flow.offer("a")
    flow.books.received += 1
    with pytest.raises(FlowError, match="do not balance"):
        flow.check()


# --- any sequence of steps keeps the books balanced ------------------------------------------------

STEPS = st.sampled_from(["offer", "refuse", "fault", "reserve", "unreserve", "take", "send", "answer",
                         "claim", "settle", "release", "finish", "resize", "disable", "enable"])


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(STEPS, st.integers(0, 63), st.sampled_from(OUTCOMES)), max_size=80))
def test_random_sequences_keep_the_books_balanced(steps: list[tuple[str, int, str]]) -> None:
    """The steps a caller may take, in any order: the books balance after each, the window holds."""
    flow: FlowControl[int] = FlowControl(2)
    out: list[int] = []  # taken, place not released, in taking order
    settled: set[int] = set()
    for i, (step, pick, outcome) in enumerate(steps):
        seq = out[pick % len(out)] if out else None
        if step == "offer":
            flow.offer(i)
        elif step == "refuse":
            flow.refuse()
        elif step == "fault":
            flow.fault()
        elif step == "reserve" and flow.may_reserve():
            flow.reserve()
        elif step == "unreserve" and flow.reserved:
            flow.unreserve()
        elif step == "take" and flow.reserved:
            taken = flow.take()
            if taken is not None:
                assert not out or taken[0] > max(out)
                out.append(taken[0])
        elif step == "send" and seq is not None and seq not in settled:
            flow.sent(seq)
        elif step == "answer" and seq is not None:
            flow.answered(seq)
        elif step == "claim" and seq is not None and seq not in settled:
            before = flow.books.drops["overtaken"]
            if not flow.claim(seq):
                assert flow.books.drops["overtaken"] == before + 1
                settled.add(seq)
        elif step == "settle" and seq is not None:
            assert flow.settle(seq, outcome) == (seq not in settled)
            settled.add(seq)
        elif step == "release" and seq is not None and seq in settled:
            flow.release(seq)
            out.remove(seq)
        elif step == "finish" and seq is not None:  # a task's catch-all, as FilterIOC._process's finally
            flow.settle(seq, "engine_lost")
            settled.add(seq)
            flow.release(seq)
            out.remove(seq)
        elif step == "resize":
            flow.set_queue_size(1 + pick % 4)
        elif step == "disable":
            flow.set_enabled(False)
        elif step == "enable":
            flow.set_enabled(True)
        flow.check()
        assert flow.in_flight == flow.reserved + len(out)
        assert flow.pending == (1 if flow._slot else 0) + len(set(out) - settled)
        assert flow.queue_free == max(0, flow.queue_size - flow.in_flight)
        assert flow.in_engine <= len(out)
    # and once everything out is finished and nothing waits, nothing is pending
    for seq in list(out):
        flow.settle(seq, "engine_lost")
        flow.release(seq)
    flow.set_enabled(False)
    flow.check()
    assert flow.pending == 0 and flow.in_flight == flow.reserved and flow.in_engine == 0


def test_a_frame_holds_its_place_until_released() -> None:
    """What the IOC's task callback asks of a frame whose task was cancelled before it ran."""
    flow: FlowControl[str] = FlowControl(2)
    flow.offer("a")
    flow.reserve()
    taken = flow.take()
    assert taken is not None
    seq = taken[0]
    assert flow.holds(seq) and flow.in_flight == 1
    assert flow.settle(seq, "engine_lost")
    assert flow.holds(seq)  # settled, but its place is not back yet
    flow.release(seq)
    assert not flow.holds(seq) and flow.in_flight == 0 and flow.books.drops["engine_lost"] == 1
    flow.check()


def test_a_frame_task_cancelled_before_it_ran_gives_its_place_back() -> None:
    """An engine lost right after dispatch cancels a frame's task before its first step: its ``finally``
    never runs, so the task's done-callback settles the frame and frees its place (else the window
    loses the place for good, and once all are lost the filter publishes nothing)."""
    from cdae.ioc.filter import FilterIOC

    async def scenario() -> FlowControl[str]:
        ioc = FilterIOC.__new__(FilterIOC)  # the flow glue alone: no source, engine or PVs
        ioc.flow = FlowControl(1)
        ioc._permits = asyncio.Condition()
        ioc._tasks, ioc._pending_writes, ioc.pvs = set(), set(), None
        ioc.flow.offer("frame")
        ioc.flow.reserve()
        taken = ioc.flow.take()
        assert taken is not None

        async def never_started() -> None:
            raise AssertionError("cancelled before its first step")

        t = asyncio.create_task(never_started())
        ioc._tasks.add(t)
        t.add_done_callback(functools.partial(ioc._frame_task_done, taken[0]))
        t.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await asyncio.gather(*ioc._pending_writes)
        return ioc.flow

    flow = asyncio.run(scenario())
    assert flow.in_flight == 0 and flow.may_reserve() and flow.books.drops["engine_lost"] == 1
    flow.check()
