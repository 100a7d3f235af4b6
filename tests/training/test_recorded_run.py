"""``cdae train --compare``'s reference: a run's JSON record, a package directory or NAME:VERSION in a store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdae.engine.package import read_manifest
from cdae.training.environment import recorded_run


def test_recorded_run_reads_a_record_or_a_package_or_says_what_is_missing(tmp_path: Path, tiny_package: Path) -> None:
    record = tmp_path / "run.json"
    record.write_text(json.dumps({"weights_sha256": "a" * 64, "metrics": {}}))
    assert recorded_run(str(record)) == {"weights_sha256": "a" * 64, "metrics": {}}
    sha = read_manifest(tiny_package).weights_sha256
    assert recorded_run(str(tiny_package))["weights_sha256"] == sha
    assert recorded_run("tiny:1", tiny_package.parent.parent)["weights_sha256"] == sha
    with pytest.raises(LookupError, match="no package or run record there"):
        recorded_run(str(tmp_path / "no" / "such"))
    with pytest.raises(LookupError, match="no recorded package to compare with"):
        recorded_run("nosuch:9", tiny_package.parent.parent)
