"""The frame clients' shared core, without sockets: ids, round robin, the window, reply matching, errors."""

from __future__ import annotations

import numpy as np
import pytest

from cdae.engine.client import AsyncEngineClient, EngineClient, FrameClientCore
from cdae.engine.errors import EngineError, EngineTimeout
from cdae.engine.protocol import ProtocolError, decode_request, error_reply


def test_both_clients_share_one_core() -> None:
    assert issubclass(EngineClient, FrameClientCore) and issubclass(AsyncEngineClient, FrameClientCore)


def test_core_checks_window_and_endpoints() -> None:
    with pytest.raises(EngineError, match="window must be >= 1"):
        FrameClientCore("tcp://127.0.0.1:5555", window=0, timeout_s=1.0)
    with pytest.raises(EngineError, match="no engine endpoint"):
        FrameClientCore([], window=1, timeout_s=1.0)


def test_core_numbers_frames_and_spreads_them_round_robin() -> None:
    core: FrameClientCore[int] = FrameClientCore(["tcp://a:1", "tcp://b:1", "tcp://c:1"], window=4, timeout_s=1.0)
    frame = np.zeros((4, 6), np.uint16)
    sent = [core._request(frame, None, {}) for _ in range(4)]
    assert [(fid, i) for fid, _, i in sent] == [(0, 0), (1, 1), (2, 2), (3, 0)]
    fid, parts, _ = core._request(frame, 42, {"unique_id": 7})
    request = decode_request(parts, 1 << 20)
    assert fid == 42 and request.header.frame_id == 42 and request.header.unique_id == 7


def test_core_matches_replies_and_counts_strangers() -> None:
    core: FrameClientCore[str] = FrameClientCore("tcp://a:1", window=2, timeout_s=1.0)
    core.waiting.update({0: "first", 1: "second"})
    assert core.in_flight == 2
    reply, waiter = core._match(error_reply("dropped", "replaced", frame_id=1))
    assert (reply.frame_id, reply.error_code, waiter) == (1, "dropped", "second") and core.in_flight == 1
    for stranger in (error_reply("dropped", "x", frame_id=9), error_reply("bad_message", "no id")):
        assert core._match(stranger)[1] is None
    assert core.unmatched == 2 and core.in_flight == 1
    with pytest.raises(ProtocolError):
        core._match([b"not json"])


def test_core_says_the_same_timeout_for_either_client() -> None:
    core: FrameClientCore[int] = FrameClientCore(["tcp://a:1", "tcp://b:1"], window=2, timeout_s=1.0)
    core.waiting[3] = 0
    e = core._timeout(2.5)
    assert isinstance(e, EngineTimeout) and str(e) == "no reply from tcp://a:1, tcp://b:1 within 2.5 s (1 frames in flight)"
    assert str(core._timeout(2.5, 3)) == "no reply to frame 3 from tcp://a:1, tcp://b:1 within 2.5 s"
