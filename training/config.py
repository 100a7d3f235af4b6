"""Training configuration: nested pydantic models, one loader for TOML/YAML/JSON, dotted overrides.

Config is data: the effective configuration is saved with the model, and it is enough (with the
code version) to reproduce the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from cdae import tomlfile
from cdae.engine.architecture import ArchitectureConfig
from cdae.engine.normalise import NormalisationConfig
from cdae.engine.package import Manifest
from cdae.training.defects import MASK_BITS, MASK_SUBCLASSES, DefectConfig
from cdae.training.simulate import SceneConfig


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field."""


class _Strict(BaseModel):
    # overrides are parsed as YAML: "version=2" must stay the string "2"
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), coerce_numbers_to_str=True)


class DataConfig(_Strict):
    """Simulated training data, generated on the fly from seeds (never stored)."""

    train_seed: int = Field(1000, description="data stream seed for training (member seed is added)")
    val_seed: int = Field(2, description="seed of the validation set (used for early checks and baseline tuning)")
    test_seed: int = Field(3, description="seed of the held-out evaluation set")
    patch_size: int = Field(96, ge=32, le=512, description="side of the simulated training frames (px)")
    frames_per_epoch: int = Field(2048, ge=8)
    val_frames: int = Field(48, ge=4)
    val_size: int = Field(128, ge=32, le=1024)
    bit_depths: list[int] = Field(default_factory=lambda: [8, 12, 16])
    scene: SceneConfig = Field(default_factory=SceneConfig)
    defects: DefectConfig = Field(default_factory=DefectConfig)

    @model_validator(mode="after")
    def _disjoint(self) -> DataConfig:
        if len({self.train_seed, self.val_seed, self.test_seed}) != 3:
            raise ValueError("train_seed, val_seed and test_seed must differ (held-out sets are disjoint)")
        bad = [b for b in self.bit_depths if b not in (8, 12, 16)]
        if bad or not self.bit_depths:
            raise ValueError(f"bit_depths must be a non-empty subset of [8, 12, 16], got {self.bit_depths}")
        return self


class OptimConfig(_Strict):
    batch_size: int = Field(16, ge=1)
    epochs: int = Field(20, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(5e-5, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="0: off. Else the weights validated, handed to the next stage and shipped are an exponential "
        "moving average of the optimiser's, updated after every step with decay min(ema_decay, (1 + t) / (10 + t)) "
        "(t: the step within the stage): the end of a stage is then an average over its last steps, not the last "
        "step's point of a noisy descent; the mean age of what it holds is about t / 10 steps until the cap is "
        "reached (0.998 at t ~ 4500), then 1 / (1 - ema_decay)",
    )


class LossConfig(_Strict):
    kind: Literal["charbonnier", "l1", "mse"] = "charbonnier"
    charbonnier_eps: float = Field(1e-3, gt=0)
    bright_weight: float = Field(4.0, ge=0, description="extra weight on pixels of bright real features")
    defect_weight: float = Field(1.0, ge=0, description="extra weight on defect pixels in the restoration loss")
    defect_bce_weight: float = Field(0.1, ge=0, description="weight of the defect-head cross entropy")
    linear_weight: float = Field(
        0.0, ge=0,
        description="weight of a second restoration term in linear (expanded) normalised units, where PSNR and "
        "RMSE are measured; the range compression shrinks errors on bright pixels, this term does not",
    )
    defect_bce_pixel_weights: bool = Field(
        False,
        description="weigh the defect head's cross entropy with the same per-pixel map as the restoration loss, "
        "so that calling a real bright feature a defect costs as much as blurring it",
    )
    class_weights: dict[str, float] = Field(
        default_factory=dict,
        description="extra weight on the pixels of named defect classes (dead, hot, bad_line, bloom, radiation, "
        "saturated_blob, or radiation_track: the radiation hits shaped as streaks), on top of defect_weight: "
        "with bright_weight high the loss keeps anything that might be real unless it is nearly sure; a class "
        "the network can tell by shape (tracks: straight, uniform, hard-ended, unlike tapered curved "
        "filaments) is worth removing at lower certainty",
    )

    @model_validator(mode="after")
    def _known_classes(self) -> LossConfig:
        known = [*MASK_BITS, *MASK_SUBCLASSES]
        unknown = sorted(set(self.class_weights) - set(known))
        if unknown:
            raise ValueError(f"class_weights: unknown defect classes {unknown}; known: {known}")
        if any(v < 0 for v in self.class_weights.values()):
            raise ValueError("class_weights: weights must be >= 0")
        return self


class StageConfig(_Strict):
    """One stage of a staged recipe: the run's config with these sections changed, trained on from the
    previous stage's weights with a fresh optimiser and learning-rate schedule."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    data: dict[str, JsonValue] = Field(default_factory=dict, description="changes to [data] for this stage")
    optim: dict[str, JsonValue] = Field(default_factory=dict, description="changes to [optim] for this stage")
    loss: dict[str, JsonValue] = Field(default_factory=dict, description="changes to [loss] for this stage")


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class TrainConfig(_Strict):
    """One training run; ``seed`` drives weight initialisation and the data stream.

    With ``stages`` the run is a staged recipe from one config: stage ``i`` is this config with the
    stage's sections changed, and starts from stage ``i - 1``'s weights (the first from ``init_from``
    or from scratch); one package is written at the end, with every stage recorded.
    """

    name: str = "cdae"
    version: str = "1"
    seed: int = 0
    threads: int = Field(2, ge=1, description="torch CPU threads; fixed because it can change float reductions")
    device: str = Field(
        "cpu",
        description="torch device to train on: 'cpu' (bit-reproducible: same config, seed and threads give the "
        "same weights) or 'cuda[:N]' (faster, for exploring configs; float reductions on a GPU are not "
        "bit-reproducible, so a shipped model is trained on the CPU)",
    )
    init_from: str | None = Field(None, description="package dir or NAME:VERSION to fine-tune from")
    architecture: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    normalisation: NormalisationConfig = Field(default_factory=NormalisationConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    stages: list[StageConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stages_valid(self) -> TrainConfig:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must differ, got {names}")
        self.stage_configs()  # each stage must be a valid config of its own
        return self

    def stage_configs(self) -> list[TrainConfig]:
        """The stages as plain (unstaged) configs, in order; ``[self]`` for an unstaged run."""
        if not self.stages:
            return [self]
        base = self.model_dump(mode="json", exclude={"stages"})
        out = []
        for st in self.stages:
            data = _merged(base, {"data": st.data, "optim": st.optim, "loss": st.loss})
            try:
                out.append(TrainConfig.model_validate(data))
            except ValidationError as e:
                fields = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
                raise ValueError(f"stage {st.name!r}: {fields}") from None
        return out


def recorded_training_config(manifest: Manifest) -> dict:
    """A package's recorded training config, as the distribution it was really trained on.

    Fields added to the generator since then take their new defaults when the record is
    validated; where those defaults changed the frames, the old behaviour is filled in here:
    generator 1.1 drew plasma without an optical PSF (``plasma_psf_sigma_px = (0, 0)``).
    """
    cfg = manifest.training_config.model_dump(mode="json")  # a deep copy: the record itself stays untouched
    data = cfg.get("data")
    if manifest.data_generator_version == "1.1" and isinstance(data, dict):
        scene = data.setdefault("scene", {})
        if isinstance(scene, dict):
            scene.setdefault("plasma_psf_sigma_px", [0.0, 0.0])
    return cfg


def recorded_data_config(manifest: Manifest) -> DataConfig | None:
    """The data distribution a package was trained on (``recorded_training_config``), None if unrecorded."""
    data = recorded_training_config(manifest).get("data")
    return DataConfig.model_validate(data) if isinstance(data, dict) else None


def read_config_file(path: Path | str) -> dict:
    """Read TOML, YAML or JSON into a plain dict."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        if path.suffix == ".toml":
            return tomlfile.loads(text)
        if path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text) or {}
        if path.suffix == ".json":
            return json.loads(text)
    except (tomlfile.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use .toml, .yaml or .json")


def apply_override(data: dict, item: str) -> None:
    """Apply ``a.b.c=value`` in place; value parsed as YAML (numbers, bools, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value ({e})") from e


def load_train_config(path: Path | str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The one loader: file (optional) + dotted overrides → validated TrainConfig."""
    data: dict = read_config_file(path) if path else {}
    for item in overrides or []:
        apply_override(data, item)
    return validate_config(TrainConfig, data, "training")


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def validate_config(model: type[ConfigT], data: dict, what: str) -> ConfigT:
    """Validate ``data`` as ``model``; a :class:`ConfigError` names every wrong field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid {what} config:\n  " + "\n  ".join(lines)) from e


def with_overrides(config: ConfigT, overrides: list[str], what: str) -> ConfigT:
    """``config`` with dotted ``KEY=VALUE`` overrides applied (as ``--set`` does), validated again."""
    data = config.model_dump(mode="json")
    for item in overrides:
        apply_override(data, item)
    return validate_config(type(config), data, what)
