"""``passthrough``: an identity network (restored = input), to measure everything but the model."""

from __future__ import annotations

import numpy as np

from cdae.engine.backends.base import Backend
from cdae.engine.package import Manifest


class PassthroughBackend(Backend):
    """Identity network: restored = input frame, defect probability 0. Measures the engine without a model."""

    name = "passthrough"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest, "cpu")

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # the input plane itself, not a copy: the frame path reads the network's output and never writes into it
        return np.asarray(x[0], dtype=np.float32), np.zeros(x.shape[1:], dtype=np.float32)

