"""The IOC side's sans-I/O frame logic: reshaping, CA reinterpretation, dtype mapping, newest-wins."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdae.ioc.frames import (
    EPICS_EPOCH_OFFSET_S,
    FrameError,
    IocError,
    LatestSlot,
    NDDataType,
    RateMeter,
    ca_element_dtype,
    engine_dtype,
    frame_from_ca,
    nd_data_type,
    nd_timestamp,
    parse_model_ref,
    posix_to_epics,
    to_ca,
    to_engine,
)


def test_data_type_order_is_adcore() -> None:
    assert [t.name for t in NDDataType] == ["Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64",
                                            "Float32", "Float64"]


def test_uint16_travels_as_dbr_short_and_comes_back() -> None:
    frame = np.array([[0, 1, 32767], [32768, 40000, 65535]], np.uint16)
    wire = to_ca(frame, ca_element_dtype(NDDataType.UInt16))
    assert wire.dtype == np.int16 and wire.tolist() == [0, 1, 32767, -32768, -25536, -1]
    # caproto's client hands arrays over big-endian: astype, never view
    big = wire.astype(">i2")
    back = frame_from_ca(big, 3, 2, NDDataType.UInt16)
    assert back.dtype == np.uint16 and back.dtype.isnative
    np.testing.assert_array_equal(back, frame)
    wrong = big.view(np.uint16).reshape(2, 3)  # what a view would have produced
    assert not np.array_equal(wrong, frame)


@given(st.lists(st.integers(0, 65535), min_size=6, max_size=6))
def test_uint16_round_trip_property(values: list[int]) -> None:
    frame = np.array(values, np.uint16).reshape(2, 3)
    wire = to_ca(frame, np.int16).astype(">i2")
    np.testing.assert_array_equal(frame_from_ca(wire, 3, 2, NDDataType.UInt16), frame)


@given(st.lists(st.integers(0, 255), min_size=4, max_size=4))
def test_int8_round_trip_through_dbr_char(values: list[int]) -> None:
    frame = np.array(values, np.uint8).view(np.int8).reshape(2, 2)
    wire = to_ca(frame, ca_element_dtype(NDDataType.Int8))
    np.testing.assert_array_equal(frame_from_ca(wire, 2, 2, NDDataType.Int8), frame)


def test_longer_waveform_is_cut_to_the_frame_size() -> None:
    data = np.arange(20, dtype=np.int16)
    f = frame_from_ca(data, 4, 3, NDDataType.Int16)
    assert f.shape == (3, 4) and f[2, 3] == 11


def test_size_and_data_length_disagree() -> None:
    with pytest.raises(FrameError, match="12 pixels.*has 10 elements"):
        frame_from_ca(np.zeros(10, np.int16), 4, 3, NDDataType.Int16)
    with pytest.raises(FrameError, match="expected both"):
        frame_from_ca(np.zeros(10, np.int16), 0, 3, NDDataType.Int16)


def test_engine_dtypes_preserve_values() -> None:
    assert engine_dtype(NDDataType.UInt16) == np.uint16
    assert engine_dtype(NDDataType.Int8) == np.int16
    assert engine_dtype(NDDataType.Float64) == np.float32
    f = np.array([[-128, 127]], np.int8)
    np.testing.assert_array_equal(to_engine(f, NDDataType.Int8), [[-128, 127]])
    with pytest.raises(FrameError, match="does not take UInt32"):
        engine_dtype(NDDataType.UInt32)
    with pytest.raises(FrameError, match="64-bit"):
        ca_element_dtype(NDDataType.Int64)


def test_float_into_integer_element_rounds_and_clips() -> None:
    assert to_ca(np.array([-3.0, 1.6, 1e9]), np.int16).tolist() == [-3, 2, 32767]


def test_nd_data_type_of_numpy() -> None:
    assert nd_data_type(np.dtype(">u2")) is NDDataType.UInt16
    assert nd_data_type(np.float32) is NDDataType.Float32
    with pytest.raises(FrameError):
        nd_data_type(np.complex64)


def test_epics_timestamps() -> None:
    ts = EPICS_EPOCH_OFFSET_S + 100.25
    assert posix_to_epics(ts) == (100, 250_000_000)
    assert nd_timestamp(posix_to_epics(ts)) == pytest.approx(100.25)
    assert posix_to_epics(EPICS_EPOCH_OFFSET_S + 5.9999999999) == (6, 0)


def test_latest_slot_newest_wins() -> None:
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is None
    assert slot.put(2) == 1  # 1 was dropped
    assert slot and slot.take() == 2 and not slot and slot.take() is None


def test_rate_meter() -> None:
    now = [0.0]
    m = RateMeter(window_s=2.0, clock=lambda: now[0])
    for _ in range(11):
        m.tick()
        now[0] += 0.1
    assert m.rate_hz() == pytest.approx(10.0)
    now[0] += 10
    assert m.rate_hz() == 0.0


@pytest.mark.parametrize("bad", ["", "tiny", ":1", "tiny:", "a b:1", "x:1;rm"])
def test_model_ref_refuses_bad_values(bad: str) -> None:
    with pytest.raises(IocError, match="NAME:VERSION"):
        parse_model_ref(bad)


def test_model_ref_accepts() -> None:
    assert parse_model_ref(" cdae-default:1.2_s3 ") == "cdae-default:1.2_s3"


def test_ioc_config_from_toml(tmp_path) -> None:  # noqa: ANN001
    from cdae.ioc.filter import load_ioc_config

    p = tmp_path / "ioc.toml"
    p.write_text('source = "13SIM1:image1:"\nprefix = "13SIM1:CDAE1:"\nengine = "tcp://127.0.0.1:6000"\n'
                 'queue_size = 3\n')
    c = load_ioc_config(p, {"model": "tiny:1", "queue_size": None})
    assert c.engine == ["tcp://127.0.0.1:6000"] and c.queue_size == 3 and c.model == "tiny:1"
    assert c.control_endpoint() == "tcp://127.0.0.1:6001"
    w = load_ioc_config(None, {"source": "WF:image", "prefix": "P:", "width": 4, "height": 2, "data_type": "UInt16"})
    assert w.plain_waveform and w.data_type is NDDataType.UInt16
    with pytest.raises(ValueError):
        load_ioc_config(None, {"source": "S:", "prefix": "P:", "queue_size": 0})


def test_ioc_package_does_not_import_torch() -> None:
    """Nor p4p: PV Access is opt-in, imported when a configuration asks for it."""
    code = ("import sys, cdae.ioc, cdae.ioc.filter, cdae.ioc.pva, cdae.simcamera, cdae.ioc.pvs, cdae.cli; "
            "print('torch' in sys.modules, 'p4p' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_pv_contract_names() -> None:
    from cdae.ioc.pvs import filter_pvs

    pvs = filter_pvs(np.int16, 16)(prefix="P:")
    names = set(pvs.pvdb)
    required = [
        "ArrayData", "NDimensions_RBV", "Dimensions_RBV", "ArraySize0_RBV", "ArraySize1_RBV", "ArraySize2_RBV",
        "ArraySizeX_RBV", "ArraySizeY_RBV", "ArraySizeZ_RBV", "ArraySize_RBV", "DataType_RBV", "ColorMode_RBV",
        "UniqueId_RBV", "TimeStamp_RBV", "EpicsTSSec_RBV", "EpicsTSNsec_RBV", "ArrayCounter", "ArrayCounter_RBV",
        "ArrayRate_RBV", "PluginType_RBV", "PortName_RBV", "NDArrayPort", "NDArrayPort_RBV", "NDArrayAddress",
        "NDArrayAddress_RBV", "ADCoreVersion_RBV", "DriverVersion_RBV", "NDAttributesFile", "EnableCallbacks",
        "EnableCallbacks_RBV", "BlockingCallbacks", "BlockingCallbacks_RBV", "QueueSize", "QueueSize_RBV",
        "QueueFree", "DroppedArrays", "DroppedArrays_RBV", "ExecutionTime_RBV", "Latency_RBV",
        "Residual:ArrayData", "Residual:ArraySize0_RBV", "Residual:DataType_RBV", "DefectMap:ArrayData",
        "Model", "Model_RBV", "Models_RBV", "Backend_RBV", "EngineConnected_RBV", "LastError_RBV", "Status_RBV",
    ]
    missing = [n for n in required if "P:" + n not in names]
    assert not missing
    assert pvs.enable_callbacks.enum_strings == ("Disable", "Enable") or list(pvs.enable_callbacks.enum_strings) == [
        "Disable", "Enable"]
    assert pvs.plugin_type.value.startswith("NDPluginStdArrays")


def test_ioc_talks_to_the_engine_only_through_its_client_and_protocol() -> None:
    import ast
    from pathlib import Path

    allowed = {"cdae.engine.client", "cdae.engine.protocol", "cdae.engine.errors",
               "cdae.engine.triton_client",  # the client of a triton:// engine: the same requests, no torch
               "cdae.engine.badpixels",  # numpy only: the IOC reads and checks the camera's map, the engine fills it
               "cdae.engine.residual",  # numpy only: raw - denoised, the IOC's Residual by the pipeline's definition
               "cdae.engine.config"}  # the CURVE key settings the engine client takes
    root = Path(__file__).resolve().parents[2] / "ioc"
    found = set()
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found.update(n for n in names if n.startswith(("cdae.engine", "cdae.training", "torch")))
    assert found and found <= allowed, found - allowed


def test_uint8_images_are_served_as_bytes_not_as_text() -> None:
    """Every uint8 ``ArrayData`` (a UInt8 camera's denoised frame, the defect map, the health map) is caproto's
    byte channel: a frame written is kept as its array and a read serves it as it is. caproto's default for
    DBR_CHAR is its string channel, which decoded each 1 MB map into a str and served every read of it
    element by element: a client monitoring the 1024² defect map took the IOC from 16 to 80 ms a frame."""
    import asyncio

    from caproto import ChannelByte, ChannelType

    from cdae.ioc.health import with_health
    from cdae.ioc.pvs import filter_pvs

    n = 64 * 48
    group = with_health(filter_pvs(np.uint8, n), n)(prefix="T:")
    channels = [group.array_data, group.defect_map.array_data, group.health.health_map.array_data]
    frame = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    frame[::7] = 0  # NULs inside the image stay pixels

    async def write_and_read(ch: ChannelByte) -> np.ndarray:
        await ch.write(frame)
        _, value = await ch.read(ChannelType.TIME_CHAR)
        return np.frombuffer(bytes(value), dtype=np.uint8) if not isinstance(value, np.ndarray) else value

    for ch in channels:
        assert isinstance(ch, ChannelByte), type(ch).__mro__
        assert isinstance(ch.value, np.ndarray)
        np.testing.assert_array_equal(asyncio.run(write_and_read(ch)), frame)
