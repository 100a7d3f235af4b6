"""The engine's exception hierarchy: every error the engine raises on purpose is an :class:`EngineError`.

Defined here (standard library only): ``BackendError`` and ``BackendUnavailable``, ``EngineTimeout``.
Defined beside the code that raises them, each an ``EngineError``: ``ModelPackageError``
(:mod:`cdae.engine.package`), ``NormalisationError`` (:mod:`cdae.engine.normalise`) and ``TilingError``
(:mod:`cdae.engine.tiling`), both ValueErrors as well, as callers catch them; ``ProtocolError``
(:mod:`cdae.engine.protocol`), ``BadPixelError`` (:mod:`cdae.engine.badpixels`) and
``ArtefactIntegrityError`` (a ``BackendError``, :mod:`cdae.engine.artefacts`).
"""

from __future__ import annotations


class EngineError(Exception):
    """Something the inference engine or one of its clients cannot do; the message says why."""


class BackendError(EngineError):
    """A backend failed to build, load or run a model."""


class BackendUnavailable(BackendError):
    """The requested backend cannot run here (no GPU, no TensorRT); the message says what to install."""


class EngineTimeout(EngineError):
    """No reply from an engine within the client's timeout."""
