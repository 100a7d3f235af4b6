"""The engine's backend names: one list, imported by the engine, its configuration, the demo and every
command line (standard library only, so that ``cdae --help`` stays light)."""

from __future__ import annotations

from typing import Literal, get_args

BackendKind = Literal["auto", "tensorrt", "torch-cuda", "torch-cpu", "onnxruntime", "passthrough"]
BACKEND_KINDS: tuple[str, ...] = get_args(BackendKind)
#: ``auto`` tries these in order.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "torch-cuda", "torch-cpu")
