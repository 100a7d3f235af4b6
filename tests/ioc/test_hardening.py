"""Issue 21, the IOC half: untrusted PV writes, frames that do not fit, stale alarms, books that balance.

Real processes on loopback (engine, simulated camera, filter IOC), driven with the clients users run.
"""

from __future__ import annotations

from caproto import AlarmSeverity, AlarmStatus, ChannelType

from ioc_helpers import Stack, _pv, ca_read, long_string_of, value_of, wait_for  # type: ignore[import-not-found]


def _counter(name: str) -> int:
    return int(value_of(name))  # type: ignore[arg-type]


def _put_long(name: str, text: str, wait: bool = True, timeout: float = 10.0) -> object:
    """A long string goes whole as CHAR through ``.VAL$``; with ``wait`` the put-notify reply comes back."""
    return _pv(name + ".VAL$").write(list(text.encode()) + [0], wait=wait, timeout=timeout,  # type: ignore[attr-defined]
                                     data_type=ChannelType.CHAR)


# --- defects 12 and 5: refusals reach the client; a later good write clears the alarm -----------

def test_refused_writes_answer_putfail_and_a_good_write_clears_the_alarm(stack: Stack) -> None:
    eng = stack.engine()
    stack.camera(size="32x24", rate=5)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: "tiny:2" in long_string_of(out + "Models_RBV"), 60, "the model list")
    for pv, bad, good in (("QueueSize", 0, 3), ("Model", "tiny:9", "tiny:2"), ("DroppedArrays", 5, 0)):
        reply = _pv(out + pv).write([bad], wait=True, timeout=10)  # type: ignore[attr-defined]
        assert reply.status.name == "ECA_PUTFAIL", pv  # type: ignore[attr-defined]
        md = ca_read(out + pv).metadata  # type: ignore[attr-defined]
        assert (md.status, md.severity) == (AlarmStatus.WRITE, AlarmSeverity.MAJOR_ALARM), pv
        reply = _pv(out + pv).write([good], wait=True, timeout=120)  # type: ignore[attr-defined]
        assert reply.status.name == "ECA_NORMAL", pv  # type: ignore[attr-defined]
        md = ca_read(out + pv).metadata  # type: ignore[attr-defined]
        assert (md.status, md.severity) == (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM), pv
    wait_for(lambda: value_of(out + "Model_RBV") == "tiny:2", 60, "frames from the model written")
