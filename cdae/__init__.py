"""cdae: a live, reproducible denoising filter for scientific camera images in EPICS."""

from __future__ import annotations

__version__ = "0.1.0"
