"""One exception hierarchy for the engine: every error it raises on purpose is an EngineError."""

from __future__ import annotations

from cdae.engine.artefacts import ArtefactIntegrityError
from cdae.engine.badpixels import BadPixelError
from cdae.engine.errors import BackendError, BackendUnavailable, EngineError, EngineTimeout
from cdae.engine.normalise import NormalisationError
from cdae.engine.package import ModelPackageError
from cdae.engine.protocol import ProtocolError
from cdae.engine.tiling import TilingError


def test_every_engine_error_is_an_engine_error() -> None:
    for cls in (BackendError, BackendUnavailable, EngineTimeout, ModelPackageError, NormalisationError, TilingError,
                ProtocolError, BadPixelError, ArtefactIntegrityError):
        assert issubclass(cls, EngineError), cls


def test_older_bases_are_kept_for_callers_that_catch_them() -> None:
    assert issubclass(NormalisationError, ValueError) and issubclass(TilingError, ValueError)
    assert issubclass(BackendUnavailable, BackendError) and issubclass(ArtefactIntegrityError, BackendError)
