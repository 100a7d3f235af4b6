"""``onnxruntime``: the package's exported ONNX graph in ONNX Runtime on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdae.engine.architecture import pad_to_multiple
from cdae.engine.artefacts import ONNX_INPUT, ONNX_OUTPUTS, artefact_dir, onnx_artefact
from cdae.engine.backends.base import Backend, Log
from cdae.engine.config import BackendOptions
from cdae.engine.errors import BackendError, BackendUnavailable
from cdae.engine.package import Manifest


def _import_onnxruntime():  # noqa: ANN202
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable("the onnxruntime backend needs onnxruntime: pip install 'cdae[onnx]'") from e
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """The package's exported ONNX graph in ONNX Runtime: what `cdae export` verifies, and a CPU
    backend for hosts where the ONNX graph runs faster than torch (see bench/)."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, model: nn.Module, pkg: Path, options: BackendOptions,
                 log: Log = lambda s: None, onnx_path: Path | None = None, threads: int | None = None) -> None:
        ort = _import_onnxruntime()
        super().__init__(manifest, "cpu")
        if onnx_path is None:
            cache = artefact_dir(pkg, manifest, options.artefact_dir)
            onnx_path = onnx_artefact(pkg, manifest, model, cache, options.trt_max_side, log)
        self.onnx_path = Path(onnx_path)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"onnxruntime cannot load {self.onnx_path.name}: {e}") from e
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != ([ONNX_INPUT], list(ONNX_OUTPUTS)):
            raise BackendError(f"{self.onnx_path.name}: unexpected inputs/outputs {names}")
        self.ort_version = ort.__version__

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, h, w = x.shape
        t, _ = pad_to_multiple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], self.multiple)
        restored, prob = self.session.run(None, {ONNX_INPUT: t.numpy()})
        return (np.ascontiguousarray(restored[0, 0, :h, :w], dtype=np.float32),
                np.ascontiguousarray(prob[0, 0, :h, :w], dtype=np.float32))

    def describe(self) -> dict[str, str | int | float | bool | None]:
        return {**super().describe(), "onnx": str(self.onnx_path), "onnxruntime": self.ort_version}

