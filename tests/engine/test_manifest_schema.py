"""The manifest's schema: typed training_config and metrics, a schema version, explicit migrations.

Every committed package (the store's default and rollback; :1 ... :7 were all schema 1) must still load as it is, its
weights' sha256 unchanged, and read back the same training_config and metrics it holds on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from cdae.engine.architecture import ArchitectureConfig, build_model
from cdae.engine.package import (
    MANIFEST_FILE,
    MIGRATIONS,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    Manifest,
    MetricsRecord,
    ModelPackageError,
    TrainingConfigRecord,
    load_package,
    migrate_manifest,
    read_manifest,
    sha256_file,
    write_package,
)

MODELS = Path(__file__).resolve().parents[2] / "models" / "cdae-default"
SCHEMA_1 = Path(__file__).parents[1] / "training" / "data" / "cdae-default-5.manifest.json"
COMMITTED = sorted((p for p in MODELS.iterdir() if (p / MANIFEST_FILE).is_file()), key=lambda p: int(p.name))
ARCH = ArchitectureConfig(base_width=4, depth=1, convs_per_level=1)


def test_the_committed_packages_are_all_there() -> None:
    assert len(COMMITTED) >= 2  # the default and one rollback


@pytest.mark.parametrize("pkg", COMMITTED, ids=lambda p: f"cdae-default:{p.name}")
def test_committed_package_loads_through_the_migrations(pkg: Path) -> None:
    on_disk = json.loads((pkg / MANIFEST_FILE).read_text())
    assert on_disk.get("schema_version", 1) <= SCHEMA_VERSION  # a schema-1 package is never rewritten
    manifest, _ = load_package(pkg)  # sha256 of the weights checked against the manifest
    assert manifest.schema_version == SCHEMA_VERSION
    assert sha256_file(pkg / WEIGHTS_FILE) == manifest.weights_sha256 == on_disk["weights_sha256"]
    assert isinstance(manifest.training_config, TrainingConfigRecord) and isinstance(manifest.metrics, MetricsRecord)
    dumped = json.loads(manifest.model_dump_json())
    assert dumped["training_config"] == on_disk["training_config"]  # every key kept, none added
    assert dumped["metrics"] == on_disk["metrics"]
    assert manifest.metrics.val_psnr_db == on_disk["metrics"]["val_psnr_db"] == manifest.metrics["val_psnr_db"]
    assert manifest.training_config.seed == on_disk["training_config"]["seed"]
    assert manifest.training_config["data"] == on_disk["training_config"]["data"]


def test_migration_from_schema_1_is_explicit_and_leaves_its_input() -> None:
    # a schema-1 manifest as packages were written before schema 2 (cdae-default:5's; :6, the last shipped one,
    # left the store in session 16)
    old = json.loads(SCHEMA_1.read_text())
    assert "schema_version" not in old
    before = json.dumps(old)
    new = migrate_manifest(old)
    assert json.dumps(old) == before and new["schema_version"] == SCHEMA_VERSION
    assert {k: v for k, v in new.items() if k != "schema_version"} == old
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))
    assert migrate_manifest(new) == new  # the current schema: nothing to do
    for bad in (0, SCHEMA_VERSION + 1, "2", True):
        with pytest.raises(ModelPackageError, match="manifest schema"):
            migrate_manifest({**old, "schema_version": bad})


def test_a_newer_schema_is_refused_with_its_path(tmp_path: Path) -> None:
    pkg = shutil.copytree(COMMITTED[-1], tmp_path / "cdae-default" / "7")
    data = json.loads((pkg / MANIFEST_FILE).read_text())
    (pkg / MANIFEST_FILE).write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ModelPackageError, match=f"{MANIFEST_FILE}: manifest schema {SCHEMA_VERSION + 1}"):
        read_manifest(pkg)


def test_new_packages_are_written_in_the_current_schema(tmp_path: Path) -> None:
    pkg = write_package(tmp_path, name="m", version="1", state_dict=build_model(ARCH).state_dict(), architecture=ARCH,
                        training_config={"seed": 3, "data": {"patch_size": 32}, "future_key": [1]},
                        metrics={"val_psnr_db": 30.5, "epochs": 2, "val_bm3d_psnr_db": 29.0})
    on_disk = json.loads((pkg / MANIFEST_FILE).read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["training_config"] == {"seed": 3, "data": {"patch_size": 32}, "future_key": [1]}
    assert on_disk["metrics"] == {"val_psnr_db": 30.5, "epochs": 2, "val_bm3d_psnr_db": 29.0}
    m = read_manifest(pkg)
    assert m.training_config.seed == 3 and m.training_config.device is None and "device" not in m.training_config
    assert {**m.metrics} == on_disk["metrics"] and m.metrics.get("steps", "none") == "none"


def test_known_keys_are_typed() -> None:
    with pytest.raises(ValidationError):
        MetricsRecord.model_validate({"epochs": "many"})
    with pytest.raises(ValidationError):
        TrainingConfigRecord.model_validate({"seed": "zero"})


def test_updated_metrics_are_validated_into_the_record(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pkg = write_package(tmp_path, name="m", version="1", state_dict=build_model(ARCH).state_dict(), architecture=ARCH,
                        metrics={"val_psnr_db": 30.5})
    m = read_manifest(pkg)
    updated = m.model_copy(update={"metrics": {**m.metrics, "held_out": {"summary": {"psnr_db": 31.0}}}})
    assert isinstance(updated.metrics, MetricsRecord) and updated.metrics.held_out == {"summary": {"psnr_db": 31.0}}
    assert isinstance(Manifest.model_validate_json(updated.model_dump_json()).metrics, MetricsRecord)


def test_records_read_like_the_dicts_they_were() -> None:
    from collections.abc import Mapping

    from pydantic import BaseModel

    class Seeded(BaseModel):
        seed: int

    r = TrainingConfigRecord.model_validate({"seed": 3, "extra": {"a": 1}})
    assert isinstance(r, Mapping) and list(r) == ["seed", "extra"] and len(r) == 2 and dict(r) == {**r}
    assert Seeded.model_validate({"seed": r["seed"]}).seed == 3 and r.get("device") is None and "device" not in r
    assert not MetricsRecord() and len(MetricsRecord()) == 0
    with pytest.raises(KeyError):
        r["device"]
