"""cdae's protocol in Triton tensors, and the frame-path model's request handling, without a server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdae.engine.protocol import ProtocolError, decode_reply, encode_request, ok_reply, request_header_for
from cdae.engine.triton_wire import pack_reply, request_tensors, text_tensor, unpack_reply


def test_reply_parts_round_trip_and_a_short_data_is_refused() -> None:
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    h = request_header_for(frame, 9, unique_id=5, want_residual=True)
    parts = ok_reply(h, model="m:1", backend="b", denoised=frame, residual=frame.astype(np.float32))
    header, data = pack_reply(parts)
    r = decode_reply(unpack_reply(header, data))
    assert r.frame_id == 9 and np.array_equal(r.denoised, frame) and np.array_equal(r.residual, frame)
    with pytest.raises(ProtocolError, match="DATA"):
        unpack_reply(header, data[:-1])
    with pytest.raises(ProtocolError):
        unpack_reply(text_tensor(b"not json"), data)


def test_frame_path_answers_every_bad_request_with_an_error_reply(tmp_path: Path, triton_store: Path) -> None:
    import shutil

    from cdae.engine.config import FramePathSettings
    from cdae.engine.triton_model import FramePath

    version = tmp_path / "tiny" / "1"
    shutil.copytree(triton_store / "tiny" / "1", version / "package")
    path = FramePath(version, FramePathSettings(backend="torch-cpu", warmup_shape=(32, 32)), log=lambda s: None)
    frame = np.full((16, 16), 100, np.uint16)
    header, data = request_tensors(encode_request(request_header_for(frame, 1, unique_id=3), frame))

    def answer(*tensors: object) -> object:
        return decode_reply(path.handle(*tensors))  # type: ignore[arg-type]

    assert answer(header, data).ok
    cases = {
        "bad_message": (text_tensor(b"{not json"), data, None),
        "bad_frame": (header, data[:-2], None),
        "bad_header": (header, data, text_tensor(b'{"Bad pixels": 3}')),
    }
    for code, tensors in cases.items():
        r = answer(*tensors)
        assert not r.ok and r.error_code == code, (code, r.header.error)
    named = request_tensors(encode_request(request_header_for(frame, 2, bad_pixels="0" * 16), frame))
    r = answer(*named)
    assert r.error_code == "unknown_bad_pixels" and "BAD_PIXELS" in r.header.error.message
    path.close()


def test_a_package_in_the_wrong_version_folder_is_refused(tmp_path: Path, triton_store: Path) -> None:
    import shutil

    from cdae.engine.config import FramePathSettings
    from cdae.engine.errors import EngineError
    from cdae.engine.triton_model import FramePath

    shutil.copytree(triton_store / "tiny" / "1", tmp_path / "tiny" / "2" / "package")
    with pytest.raises(EngineError, match="version folder 2"):
        FramePath(tmp_path / "tiny" / "2", FramePathSettings(backend="torch-cpu"), log=lambda s: None)


def test_tensorrt_config_names_a_plan_per_gpu_architecture(triton_repo: Path) -> None:
    from cdae.deploy.triton import InstancePlan, config_text, network_model_config

    onnx = triton_repo / "tiny-net" / "2" / "model.onnx"
    cfg = network_model_config("tiny-net-trt", onnx, "tensorrt_plan", InstancePlan(gpus=[0, 1]),
                               {"8.9": "model_sm89.plan", "9.0": "model_sm90.plan"})
    text = config_text(cfg)
    assert 'platform: "tensorrt_plan"' in text and 'value: "model_sm90.plan"' in text and "KIND_GPU" in text
    assert text.count("instance_group") == 2
