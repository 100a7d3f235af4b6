"""The one TOML reader of every package (engine, IOC, training, deploy): tomllib, or tomli on Python 3.10.

Standard library only (and tomli where tomllib is missing), so that any package may import it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError


def loads(text: str) -> dict[str, Any]:
    """A TOML document's tables; raises :data:`TOMLDecodeError`."""
    return tomllib.loads(text)


def load(path: Path | str) -> dict[str, Any]:
    """A TOML file's tables (read as text); raises OSError or :data:`TOMLDecodeError`."""
    return loads(Path(path).read_text())
