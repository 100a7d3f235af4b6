"""The engine's bounded pending-frame slots: newest wins, fair across clients, never grows."""

from __future__ import annotations

import threading

import pytest

from cdae.engine.config import EngineConfig
from cdae.engine.frame_queue import FrameQueue


def test_newest_frame_wins_and_evictions_are_returned() -> None:
    q: FrameQueue[int] = FrameQueue(per_client=2, max_clients=4)
    assert q.put(b"a", 1) == [] and q.put(b"a", 2) == []
    assert q.put(b"a", 3) == [1]  # the oldest waiting frame is pushed out
    assert q.put(b"a", 4) == [2]
    assert len(q) == 2 and q.high_water == 2
    assert [q.get(0), q.get(0), q.get(0)] == [3, 4, None]


def test_clients_are_served_round_robin() -> None:
    q: FrameQueue[str] = FrameQueue(per_client=3, max_clients=4)
    for i in range(3):
        q.put(b"fast", f"f{i}")
    q.put(b"slow", "s0")
    assert [q.get(0) for _ in range(4)] == ["f0", "s0", "f1", "f2"]


def test_too_many_clients_are_refused_not_queued() -> None:
    q: FrameQueue[int] = FrameQueue(per_client=1, max_clients=2)
    q.put(b"a", 1)
    q.put(b"b", 2)
    assert q.put(b"c", 3) == [3] and len(q) == 2
    assert sorted(q.drain()) == [1, 2] and len(q) == 0


def test_get_wakes_up_on_put() -> None:
    q: FrameQueue[int] = FrameQueue(per_client=1, max_clients=1)
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    t.start()
    q.put(b"a", 7)
    t.join(10)
    assert got == [7]


def test_config_control_endpoint_and_validation() -> None:
    assert EngineConfig(bind="tcp://127.0.0.1:5555").control_endpoint() == "tcp://127.0.0.1:5556"
    assert EngineConfig(bind="tcp://127.0.0.1:0").control_endpoint() == "tcp://127.0.0.1:0"
    assert EngineConfig(bind="ipc:///tmp/e").control_endpoint() == "ipc:///tmp/e.control"
    assert EngineConfig(control="tcp://127.0.0.1:9").control_endpoint() == "tcp://127.0.0.1:9"
    with pytest.raises(ValueError, match="ZeroMQ endpoint"):
        EngineConfig(bind="127.0.0.1:5555")
    with pytest.raises(ValueError, match="queue"):
        EngineConfig(queue=0)


def test_waiting_bytes_are_bounded_across_clients() -> None:
    q: FrameQueue[str] = FrameQueue(per_client=2, max_clients=8, max_bytes=10)
    assert q.put(b"a", "a0", 4) == [] and q.put(b"b", "b0", 4) == []
    assert q.put(b"c", "c0", 4) == ["c0"] and q.refused_for == "bytes"  # others fill the budget: refused
    assert q.put(b"a", "a1", 6) == ["a0"]  # a client's own older frame makes room: the newest wins
    assert q.bytes == 10 and q.bytes_high_water == 10
    assert q.put(b"d", "d0", 11) == ["d0"]  # larger than the whole budget
    assert [q.get(0), q.get(0), q.get(0)] == ["a1", "b0", None] and q.bytes == 0
