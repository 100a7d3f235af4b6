"""Inference engine: architecture, model packages, backends. Knows nothing of EPICS."""
