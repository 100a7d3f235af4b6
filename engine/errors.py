"""The engine's exception hierarchy (model packages and normalisation keep their own, older ones)."""

from __future__ import annotations


class EngineError(Exception):
    """Something the inference engine or one of its clients cannot do; the message says why."""


class BackendError(EngineError):
    """A backend failed to build, load or run a model."""


class BackendUnavailable(BackendError):
    """The requested backend cannot run here (no GPU, no TensorRT); the message says what to install."""


class EngineTimeout(EngineError):
    """No reply from an engine within the client's timeout."""
