"""cdae's frame path as a Triton Python-backend model (``TritonPythonModel``): the engine's code, inside Triton.

`cdae export --to triton` writes, per model version, ``<repo>/<name>/<version>/model.py`` (a few lines
that import this class) beside a copy of the model package (``package/``: manifest and weights). Each
Triton instance of the model loads that package with :func:`cdae.engine.backends.load_backend` (so
the weights' sha256 is checked against the manifest, as the engine checks it), warms it up, and
answers each request with :func:`cdae.engine.answer.answer_frame`: the same pipeline, guard, bad-pixel
fill and reply bytes as cdae's ZeroMQ engine. The tensors are :mod:`cdae.engine.triton_wire`'s.

Settings come from the model's config.pbtxt parameters: ``cdae_settings`` (JSON of
:data:`cdae.engine.config.FramePathSettings`: backend, tiling, guard, threads). A request that
cannot be decoded gets an error reply (never a crashed instance); a package that fails its checks
fails the load, with the reason in Triton's log and in the load error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from cdae.engine.answer import answer_frame
from cdae.engine.backends import Backend, load_backend, set_cpu_threads
from cdae.engine.badpixels import BadPixelMap, BadPixelMaps
from cdae.engine.config import BackendOptions, FramePathSettings
from cdae.engine.errors import EngineError
from cdae.engine.guard import for_package
from cdae.engine.pipeline import warm_up
from cdae.engine.protocol import (
    ErrorCode,
    ProtocolError,
    decode_request,
    error_reply,
    error_reply_for,
)
from cdae.engine.triton_wire import IN_BAD_PIXELS, IN_FRAME, IN_HEADER, OUT_DATA, OUT_HEADER, text_of, pack_reply

PACKAGE_DIR = "package"  # beside model.py in each version folder
SETTINGS_PARAMETER = "cdae_settings"


def parameter(config: dict[str, Any], key: str) -> str | None:
    """A config.pbtxt ``parameters { key: ... value { string_value: ... } }`` entry, as Triton hands it over."""
    value = (config.get("parameters") or {}).get(key)
    return value.get("string_value") if isinstance(value, dict) else None


class FramePath:
    """One loaded version of a model: a backend, its guard, the bad-pixel maps seen. No Triton types in here."""

    def __init__(self, version_dir: Path, settings: Any, *, device: str | None = None,  # noqa: ANN401
                 log: Any = print) -> None:  # noqa: ANN401
        pkg = version_dir / PACKAGE_DIR
        options = settings.backend_options
        if device is not None:
            options = BackendOptions.model_validate({**options.model_dump(exclude_unset=True), "device": device})
        set_cpu_threads(settings.threads)
        self.settings = settings
        self.backend: Backend = load_backend(settings.backend, pkg, options, log)  # sha256-checked here
        self.ref = self.backend.ref
        if version_dir.name != self.ref.split(":", 1)[1]:
            self.backend.close()
            raise EngineError(f"{pkg}: the package is {self.ref}, in Triton version folder {version_dir.name}")
        self.guard = for_package(settings.guard, pkg) if settings.guard is not None else None
        self.maps = BadPixelMaps()
        t0 = time.perf_counter()
        ms = warm_up(self.backend, settings.warmup_shape, "uint16", max_pixels=settings.max_pixels,
                     margin=settings.tile_margin)
        log(f"cdae: {self.ref} on {self.backend.name} ({self.backend.device}) ready; warm-up "
            f"{settings.warmup_shape[0]}x{settings.warmup_shape[1]}: {ms:.1f} ms ({time.perf_counter() - t0:.2f} s)")

    def handle(self, header: Any, frame: Any, bad_pixels: Any | None = None,  # noqa: ANN401
               received: float | None = None) -> list[bytes | memoryview]:
        """HEADER, FRAME (and BAD_PIXELS) tensors → the reply's parts; never raises."""
        received = time.perf_counter() if received is None else received

        def fail(code: ErrorCode, message: str, request: Any = None) -> list[bytes | memoryview]:  # noqa: ANN401
            h = request.header if request is not None else None
            return error_reply(code, message, frame_id=h.frame_id if h else None, unique_id=h.unique_id if h else None,
                               timestamp=h.timestamp if h else None, model=self.ref, backend=self.backend.name)

        try:
            request = decode_request([text_of(header, "HEADER"), frame], self.settings.max_frame_pixels)
        except ProtocolError as e:
            return error_reply_for(e, model=self.ref, backend=self.backend.name)
        if bad_pixels is not None:
            try:
                key = self.maps.add(BadPixelMap.from_json(text_of(bad_pixels, "BAD_PIXELS").decode("utf-8"),
                                                          source="BAD_PIXELS"))
            except (ProtocolError, UnicodeDecodeError, ValueError, EngineError) as e:
                return fail("bad_header", f"BAD_PIXELS: not a bad-pixel map: {e}", request)
            if request.header.bad_pixels not in (None, key):
                return fail("unknown_bad_pixels", f"the frame names bad-pixel map {request.header.bad_pixels}, "
                                                  f"BAD_PIXELS holds {key}", request)
        return answer_frame(request, ref=self.ref, backend=self.backend, guard=self.guard, bad_pixels=self.maps.get,
                            received=received, max_pixels=self.settings.max_pixels, margin=self.settings.tile_margin,
                            unknown_map_hint="send the map in BAD_PIXELS with the frame").parts

    def close(self) -> None:
        self.backend.close()


# Tensors cross the stub by DLPack, not by ``as_numpy()``/``pb_utils.Tensor(name, array)``: the stub's
# numpy bridge is compiled against numpy 1.x and, under numpy 2, reads input arrays wrong and sends
# outputs empty (seen with nvidia-pytriton 0.7.0's server 2.51); DLPack goes through torch and is exact.

def _array(tensor: Any) -> np.ndarray:  # noqa: ANN401 - a pb_utils.Tensor
    import torch

    return torch.from_dlpack(tensor.to_dlpack()).numpy()


def _tensor(pb: Any, name: str, array: np.ndarray) -> Any:  # noqa: ANN401
    import torch
    from torch.utils.dlpack import to_dlpack

    return pb.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(np.array(array, copy=True))))


class TritonPythonModel:
    """What Triton's Python backend instantiates once per model instance (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton's stub

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        raw = parameter(config, SETTINGS_PARAMETER) or "{}"
        settings = FramePathSettings.model_validate_json(raw)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        device = None
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.path = FramePath(version_dir, settings, device=device, log=pb_utils.Logger.log_info)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses = []
        for r in requests:
            received = time.perf_counter()
            header = pb.get_input_tensor_by_name(r, IN_HEADER)
            frame = pb.get_input_tensor_by_name(r, IN_FRAME)
            bad = pb.get_input_tensor_by_name(r, IN_BAD_PIXELS)
            if header is None or frame is None:
                parts = error_reply("bad_message", f"expected inputs {IN_HEADER} and {IN_FRAME}",
                                    model=self.path.ref, backend=self.path.backend.name)
            else:
                parts = self.path.handle(_array(header), _array(frame), None if bad is None else _array(bad), received)
            h, data = pack_reply(parts)
            responses.append(pb.InferenceResponse([_tensor(pb, OUT_HEADER, h), _tensor(pb, OUT_DATA, data)]))
        return responses

    def finalize(self) -> None:
        path = getattr(self, "path", None)
        if path is not None:
            path.close()
