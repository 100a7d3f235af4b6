"""Helpers every package shares: one tcp:// parser and control-port rule (cdae.endpoints), one TOML reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdae import tomlfile
from cdae.engine.config import EngineConfig
from cdae.endpoints import TcpEndpoint, control_endpoint_for, is_loopback, parse_tcp


def test_parse_tcp() -> None:
    assert parse_tcp("tcp://127.0.0.1:5555") == TcpEndpoint("127.0.0.1", "5555")
    assert parse_tcp("tcp://[::1]:*") == TcpEndpoint("[::1]", "*")
    assert parse_tcp("tcp://host:0").any_port and parse_tcp("tcp://host:*").any_port  # type: ignore[union-attr]
    assert not parse_tcp("tcp://host:7").any_port  # type: ignore[union-attr]
    for other in ("ipc:///tmp/e", "inproc://x", "tcp://host", "tcp://host:port"):
        assert parse_tcp(other) is None


def test_loopback() -> None:
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1") and is_loopback("ipc:///tmp/e")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://10.0.0.2:5555")


def test_control_port_rule_is_the_engines_and_the_iocs() -> None:
    from cdae.ioc.filter import IocConfig, IocError

    assert control_endpoint_for("tcp://10.0.0.2:5555") == "tcp://10.0.0.2:5556"
    assert control_endpoint_for("tcp://127.0.0.1:*") == "tcp://127.0.0.1:*"
    assert control_endpoint_for("inproc://e") == "inproc://e.control"
    with pytest.raises(ValueError, match="cannot derive"):
        control_endpoint_for("udp://x:1")
    for bind in ("tcp://10.0.0.2:5555", "ipc:///tmp/e"):
        assert EngineConfig(bind=bind).control_endpoint() == control_endpoint_for(bind)
    ioc = IocConfig(source="S:", prefix="P:", engine=["tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"])
    assert ioc.control_endpoint() == "tcp://10.0.0.2:5556"
    for engine in ("ipc:///tmp/e", "tcp://10.0.0.2:*"):  # the IOC connects: it needs a real port
        with pytest.raises(IocError, match="give --control"):
            IocConfig(source="S:", prefix="P:", engine=[engine]).control_endpoint()


def test_one_toml_reader(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[t]\nx = 1\n')
    assert tomlfile.load(tmp_path / "a.toml") == tomlfile.loads('[t]\nx = 1\n') == {"t": {"x": 1}}
    with pytest.raises(tomlfile.TOMLDecodeError):
        tomlfile.loads("x = ")


def test_one_robust_sigma() -> None:
    import numpy as np

    from cdae.engine.robust import MAD_TO_SIGMA, mad_sigma

    a = np.array([1.0, 2.0, 3.0, 4.0, 100.0], np.float32)
    assert mad_sigma(a) == MAD_TO_SIGMA * 1.0 and mad_sigma(a, median=2.0) == MAD_TO_SIGMA * 1.0
    assert mad_sigma(np.zeros(0)) == 0.0
    rng = np.random.default_rng(0)
    assert abs(mad_sigma(rng.normal(0.0, 3.0, 100_000)) - 3.0) < 0.05


def test_order_statistics_are_numpys() -> None:
    """A frame's percentiles from its sorted values (sorted by counting for integer pixels) are np.percentile's
    bits and type, for list and scalar q; mad_sigma with the shared median is np.median's."""
    import numpy as np

    from cdae.engine.robust import MAD_TO_SIGMA, mad_sigma, percentile_of_sorted, sorted_values

    rng = np.random.default_rng(11)
    counted = 0
    for i in range(400):
        n = int(rng.integers(1, 2500))
        dtype = (np.float32, np.float64)[i % 2]
        x = [rng.integers(0, 4096, n), rng.poisson(2.0, n), rng.standard_normal(n) * 1e3,
             rng.random(n) * 3e38, rng.integers(0, 1 << 21, n)][i % 5].astype(dtype)
        if i % 7 == 0:
            x[rng.integers(0, n)] = -0.0
        s = sorted_values(x)
        assert np.array_equal(s, np.sort(x)) and s.dtype == x.dtype
        counted += int(i % 5 in (0, 1) and i % 7 != 0)
        for q in ([0.5, 99.9], [10, 80.0, 100], [0, 100], [37.3], 10, 0.1, 90, 50.0, 100, 0):
            expected, got = np.percentile(x, q), percentile_of_sorted(s, q)
            assert type(got) is type(expected) and np.asarray(got).dtype == np.asarray(expected).dtype
            assert np.asarray(got).tobytes() == np.asarray(expected).tobytes(), (i, q)
        m = np.median(x)
        assert mad_sigma(x) == MAD_TO_SIGMA * float(np.median(np.abs(x - m)))
        assert mad_sigma(x, m) == MAD_TO_SIGMA * float(np.median(np.abs(x - m)))
    assert counted > 100
    with_nan = np.array([3.0, np.nan, 1.0])
    assert np.isnan(percentile_of_sorted(sorted_values(with_nan), [50])).all()
    zeros = np.array([-0.0, 0.0, -0.0, 0.0, 5.0])  # both zeros: the same value, its sign NumPy's partition's
    assert percentile_of_sorted(sorted_values(zeros), 30) == np.percentile(zeros, 30) == 0.0
    for q in (np.float64(10), np.array(10.0)):  # NumPy scalars and 0-d q: a scalar back, as NumPy's
        assert type(percentile_of_sorted(np.sort(zeros), q)) is type(np.percentile(zeros, q))
    with pytest.raises(ValueError):
        percentile_of_sorted(np.sort(zeros), [50, 101])


def test_one_percentile_by_partition_is_numpys() -> None:
    """robust.percentile (one q, two order statistics by partition) gives np.percentile's bits and type, for float
    and integer arrays (an integer array's neighbours interpolated in float64, as NumPy does), 2-D ones and NaN."""
    import numpy as np

    from cdae.engine.robust import percentile

    rng = np.random.default_rng(12)
    for i in range(300):
        n = int(rng.integers(1, 3000))
        x = [rng.integers(0, 4096, n).astype(np.uint16), rng.standard_normal(n).astype(np.float32) * 1e3,
             rng.random(n) * 3e38, rng.integers(-5, 1 << 21, n).astype(np.int32), rng.poisson(2.0, n)][i % 5]
        if i % 11 == 0 and x.dtype.kind == "f":
            x[rng.integers(0, n)] = np.nan
        for q in (0, 0.1, 10, 50.0, 90, 99.9, 100, float(rng.random() * 100)):
            expected, got = np.percentile(x, q), percentile(x, q)
            assert type(got) is type(expected) and np.asarray(got).tobytes() == np.asarray(expected).tobytes(), (i, q)
    square = rng.integers(0, 65535, (64, 48)).astype(np.uint16)
    assert percentile(square[::4, ::4], 0.1) == np.percentile(square[::4, ::4], 0.1)
    with pytest.raises(ValueError):
        percentile(square, 101)


def test_one_queue_size_range() -> None:
    """QueueSize's PV limits and the IOC configuration's bounds are the same two numbers."""
    from pydantic import ValidationError

    from cdae.ioc.filter import IocConfig
    from cdae.ioc.pvs import QUEUE_SIZE_MAX, QUEUE_SIZE_MIN, FilterPVs

    for ok in (QUEUE_SIZE_MIN, QUEUE_SIZE_MAX):
        assert IocConfig(source="S:", prefix="P:", queue_size=ok).queue_size == ok
    for bad in (QUEUE_SIZE_MIN - 1, QUEUE_SIZE_MAX + 1):
        with pytest.raises(ValidationError):
            IocConfig(source="S:", prefix="P:", queue_size=bad)
    limits = FilterPVs.queue_size.pvspec.cls_kwargs
    assert (limits["lower_ctrl_limit"], limits["upper_ctrl_limit"]) == (QUEUE_SIZE_MIN, QUEUE_SIZE_MAX)


_WRITERS = """
import sys, threading
from cdae.lines import say
def stderr_lines():
    for i in range(3000):
        {write}("E" * 60, sys.stderr)
t = threading.Thread(target=stderr_lines)
t.start()
for i in range(3000):
    {write}("O" * 60, sys.stdout)
t.join()
"""


def test_lines_from_two_threads_on_one_pipe_arrive_whole() -> None:
    """stdout and stderr on one pipe, unbuffered, as the services' readers have them: every line ``say``
    writes arrives whole (``print`` writes the newline apart, and the other thread's line gets in between)."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _WRITERS.format(write="say")], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    assert len(lines) == 6000 and all(ln in ("E" * 60, "O" * 60) for ln in lines)
