"""The user-facing error classes of every package, for the CLI's one-line error reports.

Looked up lazily among modules already imported, so a light command never imports torch
just to know which errors it might print.
"""

from __future__ import annotations

import sys

_USER_ERRORS = (
    ("cdae.engine.package", "ModelPackageError"),
    ("cdae.engine.normalise", "NormalisationError"),
    ("cdae.training.config", "ConfigError"),
    ("cdae.training.fileio", "FileFormatError"),
    ("cdae.training.fuse", "FuseError"),
    ("cdae.training.train", "TrainingError"),
    ("cdae.training.baselines", "BaselineError"),
    ("cdae.training.metrics", "MetricsError"),
    ("cdae.training.report", "ReportError"),
    ("cdae.recording", "RecordingError"),
    ("cdae.ioc.record", "RecordError"),
    ("cdae.training.characterise", "CharacteriseError"),
    ("cdae.deploy.site", "SiteError"),
    ("cdae.deploy.export", "ExportError"),
    ("cdae.deploy.triton", "TritonError"),
    ("cdae.engine.errors", "BackendUnavailable"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "bad input from the user": reported in one line, exit status 2."""
    found: list[type[BaseException]] = []
    for module, name in _USER_ERRORS:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)
