"""Fine-tuning on a real camera's frames, which come without clean targets.

Three kinds of examples in every batch, so that the model learns this camera without forgetting
what the simulator taught it:

* **real patches, self-supervised**: where the recording has consecutive frames of one static
  scene (a diagnostic looking at a fixed target), one frame is the input and the next the target
  (Noise2Noise, Lehtinen et al. 2018): the noises are independent, so the best prediction is the
  scene. Otherwise blind spots (Noise2Void, Krull et al. 2019): a few pixels of each patch are
  replaced by a random neighbour's value and the network predicts the *raw* value there. Either
  way the camera profile's defect pixels are known corruptions: never targets, while the same
  damage is injected into the real patches at other places, where the target is free of it;
* **camera-matched simulated frames**: simulated scenes recorded with the profile's bias, gain,
  read noise and bit depth and with its defect layout (hot columns, stuck pixels, ...) injected
  at their positions: supervised inpainting of exactly this camera's damage, with clean targets;
* **the parent's simulated frames** (its training distribution): nothing is forgotten.

Same reproducibility as training (:mod:`cdae.training.train`, whose loop this reuses): same
config, seed, recording and thread count → bit-identical weights on CPU. The manifest names the
parent, the recording's sha256 and the profile; the package holds the profile and an evaluation
without ground truth (:mod:`cdae.training.evaluate_real`).
"""

from __future__ import annotations

import math
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from cdae.engine.architecture import CDAE
from cdae.engine.normalise import FullWell, detect_full_well, frame_offset_scale, mark_full_well
from cdae.engine.package import DataProvenance, ModelRegistry, read_manifest, sha256_file, write_manifest
from cdae.recording import read_runs
from cdae.training.characterise import (
    CameraProfile,
    CharacteriseError,
    characterise,
    default_profile_path,
    is_static_pair,
    load_profile,
)
from cdae.training.config import (
    DataConfig,
    TrainConfig,
    _Strict,
    apply_override,
    read_config_file,
    recorded_training_config,
    validate_config,
)
from cdae.training.dataset import simulated_frames
from cdae.training.defects import (
    BLOOM,
    SATURATED_BLOB,
    DefectLayout,
    apply_detector,
    detector_rng,
    sample_defect_params,
)
from cdae.training.metrics import EvalFrame
from cdae.training.simulate import generate_scene, scene_rng
from cdae.training.train import TrainingError, make_batch, member_data_seed, restoration_loss, total_loss, train

PROFILE_FILE = "camera_profile.json"
#: What fine-tuning changes in the parent's training config unless told otherwise: a short run
#: (320 steps) at a twentieth of the learning rate, so the parent's weights are a starting point, not
#: noise, and batches of many small patches: Adam's steps are as large on a noisy batch as on a
#: clean one, and with a few patches per batch they walk the weights away from what the parent knew.
#: 1e-4 rather than 3e-4: it forgets less of the simulated held-out set over seeds while still learning
#: a camera's new pattern (experiments/README.md, "Fine-tuning `:7` on a camera").
FINETUNE_DEFAULTS: dict[str, dict[str, object]] = {
    "optim": {"epochs": 4, "batch_size": 16, "lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 10},
    "data": {"frames_per_epoch": 1280, "patch_size": 32},
}
#: Camera-matched frames draw their data stream from this offset of the member's seed.
CAMERA_STREAM = 7919
#: A simulated patch more than this share under a glint or its bloom is left out of a batch: inside
#: a saturated blob there is nothing to see, and a small patch that lies wholly in one has a target
#: hundreds of normalised units from its input (per-patch scale: the floor, a few DN), whose one
#: step undoes what the parent knew (experiments/README.md). Training's 96/128-px patches are never
#: wholly inside one.
MAX_GLINT_SHARE = 0.5


def informative(frame: EvalFrame) -> bool:
    """Whether a simulated training patch shows some scene: at most :data:`MAX_GLINT_SHARE` of it glint or bloom."""
    return float(np.mean((frame.defect_mask & (SATURATED_BLOB | BLOOM)) != 0)) <= MAX_GLINT_SHARE


class RealDataConfig(_Strict):
    """How the recording's frames are used."""

    held_out_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="last part of each ordinary run kept for evaluation")
    held_out_min: int = Field(2, ge=0, description="at least this many held-out frames per run (pairs need 2)")
    max_frames: int = Field(256, ge=1, description="training frames loaded (evenly spaced over the runs)")
    share: float = Field(0.75, ge=0.0, le=1.0, description="share of each batch that is real patches")
    camera_share: float = Field(0.125, ge=0.0, le=1.0, description="share that is camera-matched simulated frames; "
                                "the rest is the parent's simulated frames (without them it forgets)")
    objective: Literal["auto", "noise2noise", "noise2void"] = Field(
        "auto", description="noise2noise: one frame of a static scene against the next; noise2void: blind spots "
        "in single frames; auto: noise2noise where the recording has static frame pairs")
    mask_fraction: float = Field(0.02, gt=0.0, le=0.2, description="noise2void: blind-spot pixels per patch")
    mask_radius: int = Field(2, ge=1, le=5, description="a blind spot takes a random neighbour's value within this radius")
    loss_weight: float = Field(1.0, ge=0.0, description="weight of the real frames' loss against the simulated frames'")
    inject_defects: bool = Field(True, description="add the profile's damage to real patches at other places, "
                                 "where the target is known to be free of it")


class GateConfig(_Strict):
    """When a fine-tuned child is refused: worse than its parent on the recording's held-out frames.

    The error estimate (from static pairs of held-out frames, :mod:`cdae.training.evaluate_real`)
    is compared by a paired bootstrap over 16x16 tiles; the child is worse when the one-sided
    ``confidence`` lower bound of ``mse(child) - mse(parent)`` exceeds ``max_regression`` times the
    parent's estimated MSE: on all kept pixels, or on the scene's bright features.
    """

    max_regression: float = Field(0.02, ge=0.0, description="tolerated relative increase of the estimated MSE "
                                  "(0.02: about 0.09 dB)")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="one-sided confidence of the bootstrap bound")
    resamples: int = Field(2000, ge=100, description="bootstrap resamples (seeded: the verdict is reproducible)")
    defect_drop: float = Field(0.1, ge=0.0, le=1.0, description="largest tolerated drop of a share of the "
                               "profile's defects restored (classes of at least 5 pixels) or of a bad line's "
                               "offset removed")
    sim_drop_db: float = Field(0.5, ge=0.0, description="largest tolerated drop of the simulated held-out PSNR, dB")


class FinetuneConfig(TrainConfig):
    """A fine-tuning run: the training config (simulated part) plus how real frames are used."""

    real: RealDataConfig = Field(default_factory=RealDataConfig)
    gate: GateConfig = Field(default_factory=GateConfig)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def finetune_config(parent_pkg: Path, path: Path | str | None = None, overrides: list[str] | None = None,
                    name: str | None = None, version: str | None = None, store: Path | None = None) -> FinetuneConfig:
    """The parent's training config + :data:`FINETUNE_DEFAULTS` + a config file + ``--set`` overrides.

    The version defaults to ``<parent version>-ftN``, the first N free in ``store`` (default: the parent's).
    """
    parent = read_manifest(parent_pkg)
    data: dict = {k: v for k, v in recorded_training_config(parent).items() if k in FinetuneConfig.model_fields}
    data = _merge(data, FINETUNE_DEFAULTS)
    data.update(architecture=parent.architecture.model_dump(), normalisation=parent.normalisation.model_dump(),
                init_from=str(parent_pkg), name=name or parent.name)
    data["version"] = version or _next_version(parent_pkg, (store or parent_pkg.parent.parent) / data["name"])
    if path is not None:
        data = _merge(data, read_config_file(path))
    for item in overrides or []:
        apply_override(data, item)
    return validate_config(FinetuneConfig, data, "fine-tuning")


def _next_version(parent_pkg: Path, versions: Path) -> str:
    n = 1
    while (versions / f"{parent_pkg.name}-ft{n}").exists():
        n += 1
    return f"{parent_pkg.name}-ft{n}"


# --- the recording's frames ---------------------------------------------------------------------

@dataclass
class RealFrames:
    """A recording's ordinary frames, split into training and held-out frames."""

    train: np.ndarray  # (N, H, W) float32 DN, in recording order
    offset: np.ndarray  # (N,) per-frame normalisation, as inference computes it on the whole frame
    scale: np.ndarray
    pairs: np.ndarray  # (P, 2) indices into train: two frames of one static scene (Noise2Noise pairs)
    held_out: list[np.ndarray]  # per run: (M, H, W) float32 DN, in recording order
    adc_max: float
    bias_dn: float
    valid: np.ndarray  # (H, W) bool: may serve as a target (not a known defect)
    full_wells: list[FullWell | None] | None = None  # per training frame, where normalisation.full_well = detect


def load_real_frames(recording: Path | str, profile: CameraProfile, cfg: FinetuneConfig) -> RealFrames:
    """Ordinary frames of the profile's size: the last part of each run held out, the rest for training."""
    runs = [r for r in read_runs(recording) if not r.info.dark and r.info.frames
            and (r.info.height, r.info.width) == (profile.height, profile.width)]
    if not runs:
        raise TrainingError(f"{recording}: no ordinary (non-dark) frames of {profile.width}x{profile.height}")
    adc_max = float(profile.adc_max)
    train_idx: list[tuple[int, int]] = []
    held: list[np.ndarray] = []
    for k, run in enumerate(runs):
        n = run.info.frames
        n_held = min(n - 1, max(cfg.real.held_out_min, int(round(n * cfg.real.held_out_fraction)))) if n > 1 else 0
        train_idx += [(k, i) for i in range(n - n_held)]
        if n_held:
            held.append(run.frames(slice(n - n_held, n)).astype(np.float32))
    if not train_idx:
        raise TrainingError(f"{recording}: every frame is held out; record more frames")
    picks = np.unique(np.linspace(0, len(train_idx) - 1, min(cfg.real.max_frames, len(train_idx))).round().astype(int))
    chosen = [train_idx[i] for i in picks]
    frames = np.stack([runs[k].frames([i])[0] for k, i in chosen]).astype(np.float32)
    offsets, scales = [], []
    for f in frames:  # what network_input computes on the whole frame
        o, s = frame_offset_scale(f, adc_max, cfg.normalisation)
        offsets.append(o)
        scales.append(s)
    full_wells = ([detect_full_well(f, adc_max, cfg.normalisation) for f in frames]
                  if cfg.normalisation.full_well != "off" else None)
    ratio = profile.settings.static_ratio
    pairs = [(j, j + 1) for j in range(len(chosen) - 1)
             if chosen[j][0] == chosen[j + 1][0] and is_static_pair(frames[j], frames[j + 1], ratio)]
    valid = profile.defect_mask() == 0
    return RealFrames(frames, np.array(offsets, np.float32), np.array(scales, np.float32),
                      np.array(pairs, np.intp).reshape(-1, 2), held, adc_max, profile.bias_dn, valid, full_wells)


def real_objective(cfg: RealDataConfig, real: RealFrames) -> Literal["noise2noise", "noise2void"]:
    """The self-supervised objective a run uses: Noise2Noise where static frame pairs exist (``auto``)."""
    if cfg.objective == "noise2noise" and not len(real.pairs):
        raise TrainingError("objective noise2noise needs consecutive frames of a static scene; the recording has none")
    if cfg.objective == "auto":
        return "noise2noise" if len(real.pairs) else "noise2void"
    return cfg.objective


@dataclass
class RealBatch:
    x: torch.Tensor  # (B, 2, P, P) network input
    target: torch.Tensor  # (B, 1, P, P) a raw frame, normalised like the input
    weight: torch.Tensor  # (B, 1, P, P) where the target counts (1) and where not (0)


def _window(real: RealFrames, rng: np.random.Generator, patch: int) -> tuple[slice, slice]:
    _, h, w = real.train.shape
    p = min(patch, h, w)
    top, left = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
    return slice(top, top + p), slice(left, left + p)


def _network_pair(real: RealFrames, k: int, raw_in: np.ndarray, raw_target: np.ndarray,
                  weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    off, sc = float(real.offset[k]), float(real.scale[k])
    x = np.empty((2, *raw_in.shape), np.float32)
    x[0] = (raw_in - off) / sc
    x[1] = raw_in >= real.adc_max - 0.5
    if real.full_wells is not None:  # as inference marks them (found on the whole frame)
        mark_full_well(x, raw_in, real.full_wells[k], off, sc)
    return x, ((raw_target - off) / sc)[None].astype(np.float32), weight[None].astype(np.float32)


def _stack_batch(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> RealBatch:
    return RealBatch(*(torch.from_numpy(np.stack([it[i] for it in items])) for i in range(3)))


def inject_defects(raw: np.ndarray, layout: DefectLayout, bias_dn: float, adc_max: float) -> tuple[np.ndarray, np.ndarray]:
    """``raw`` (DN) as the camera would read it with the damage of ``layout``, and where that damage is.

    Real scenes with the camera's own kinds of defect at new places: their targets (the frame
    without them) are known, so the network learns to restore exactly this camera's damage.
    """
    out = raw.astype(np.float32, copy=True)
    for line in layout.bad_lines:
        region = line.region()
        if line.kind == "hot":
            out[region] += np.float32(line.value)
        else:
            out[region] = bias_dn + (out[region] - bias_dn) * np.float32(line.value)
    dead, warm, stuck = layout.dead_pixels, layout.warm_pixels, layout.stuck_pixels
    out[dead[:, 0], dead[:, 1]] = bias_dn + (out[dead[:, 0], dead[:, 1]] - bias_dn) * layout.dead_response
    out[warm[:, 0], warm[:, 1]] += layout.warm_offset_dn
    out[stuck[:, 0], stuck[:, 1]] = layout.stuck_dn
    np.clip(np.rint(out), 0.0, adc_max, out=out)
    return out, layout.static_mask() != 0


def _injected(real: RealFrames, raw: np.ndarray, layout: DefectLayout | None,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The profile's damage seen through another window of the sensor, added to this patch (if asked)."""
    if layout is None:
        return raw, np.zeros(raw.shape, bool)
    h, w = raw.shape
    top, left = int(rng.integers(layout.height - h + 1)), int(rng.integers(layout.width - w + 1))
    return inject_defects(raw, layout.crop(top, left, h, w), real.bias_dn, real.adc_max)


def noise2noise_batch(real: RealFrames, rng: np.random.Generator, count: int, patch: int,
                      inject: DefectLayout | None = None, defect_weight: float = 0.0) -> RealBatch:
    """``count`` patches of one frame of a static pair as input, the other as target (Lehtinen et al. 2018).

    The target's noise is independent of the input's, so the best prediction is the scene itself.
    Known defects, and pixels saturated in either frame, do not count. ``inject``: the camera's
    damage added to the input at other places, where the target is clean of it (weighted
    ``1 + defect_weight``, as defects in simulated frames).
    """
    items = []
    for _ in range(count):
        a, b = real.pairs[int(rng.integers(len(real.pairs)))]
        if rng.random() < 0.5:
            a, b = b, a
        win = _window(real, rng, patch)
        xa, xb = real.train[a][win], real.train[b][win]
        weight = (real.valid[win] & (xa < real.adc_max - 0.5) & (xb < real.adc_max - 0.5)).astype(np.float32)
        xa, added = _injected(real, xa, inject, rng)
        weight[added] *= 1.0 + defect_weight
        items.append(_network_pair(real, int(a), xa, xb, weight))
    return _stack_batch(items)


def blind_spot_batch(real: RealFrames, rng: np.random.Generator, count: int, patch: int,
                     cfg: RealDataConfig, inject: DefectLayout | None = None) -> RealBatch:
    """``count`` patches with Noise2Void blind spots (N2V's uniform neighbour replacement) as the only targets.

    ``inject``: the camera's damage added at other places first; a blind spot there is still
    judged against the raw value without it.
    """
    items = []
    for _ in range(count):
        k = int(rng.integers(len(real.train)))
        win = _window(real, rng, patch)
        raw = real.train[k][win]
        p_h, p_w = raw.shape
        candidates = np.flatnonzero(real.valid[win] & (raw < real.adc_max - 0.5))
        seen, _ = _injected(real, raw, inject, rng)
        m = max(1, int(round(cfg.mask_fraction * p_h * p_w)))
        spots = rng.choice(candidates, size=min(m, candidates.size), replace=False) if candidates.size else candidates
        r = cfg.mask_radius
        dy, dx = rng.integers(-r, r + 1, spots.size), rng.integers(-r, r + 1, spots.size)
        same = (dy == 0) & (dx == 0)
        dx[same] = np.where(rng.random(int(same.sum())) < 0.5, -1, 1)  # never the pixel itself
        ys, xs = spots // p_w, spots % p_w
        filled = seen.copy()
        filled[ys, xs] = seen[np.clip(ys + dy, 0, p_h - 1), np.clip(xs + dx, 0, p_w - 1)]
        mask = np.zeros(raw.shape, np.float32)
        mask[ys, xs] = 1.0
        items.append(_network_pair(real, k, filled, raw, mask))
    return _stack_batch(items)


def real_loss(model: CDAE, batch: RealBatch, cfg: TrainConfig) -> torch.Tensor:
    """The restoration loss of the simulated frames, against a raw frame where ``batch.weight`` says.

    Charbonnier ≈ L1 estimates the conditional median, which the monotone range compression keeps:
    for symmetric noise that is the clean value, on the same footing as the simulated frames'.
    """
    device = next(model.parameters()).device
    x, target, weight = (t.to(device) for t in (batch.x, batch.target, batch.weight))
    restored, _ = model.forward_compressed(x[:, : cfg.architecture.in_channels])
    return restoration_loss(restored, model.compress(target), weight, cfg)


# --- camera-matched simulation ------------------------------------------------------------------

def camera_frames(profile: CameraProfile, data: DataConfig, seed: int, start: int, count: int,
                  size: int) -> list[EvalFrame]:
    """Simulated frames as this camera records them: its noise, bit depth and defect layout (cropped)."""
    layout = profile.layout()
    size = min(size, profile.height, profile.width)
    bits = profile.bit_depth if profile.bit_depth in (8, 12, 16) else 16
    frames = []
    for index in range(start, start + count):
        scene = generate_scene(scene_rng(seed, index), size, size, data.scene)
        rng = detector_rng(seed, index)
        params = sample_defect_params(rng, data.defects, bits)
        gain = profile.gain_e_per_dn or params.gain_e_per_dn
        update: dict[str, object] = {"bias_dn": profile.bias_dn, "read_noise_e": profile.read_noise_dn * gain,
                                     "gain_e_per_dn": gain, "full_well_e": (params.adc_max - profile.bias_dn) * gain,
                                     "full_scale_fraction": 1.0}
        params = params.model_copy(update=update)
        top, left = int(rng.integers(profile.height - size + 1)), int(rng.integers(profile.width - size + 1))
        det = apply_detector(scene.signal, rng, params, layout.crop(top, left, size, size))
        frames.append(EvalFrame(det.noisy, det.clean, det.defect_mask, det.adc_max, bits, f"camera:{scene.kind}",
                                 det.params.saturation_dn))
    return frames


# --- the run --------------------------------------------------------------------------------------

def make_step_loss(cfg: FinetuneConfig, profile: CameraProfile, real: RealFrames) -> Callable[[CDAE, int], torch.Tensor]:
    """The fine-tuning objective of the batch starting at frame ``first`` (see the module docstring)."""
    bs = cfg.optim.batch_size
    n_real = int(round(bs * cfg.real.share))
    n_cam = min(bs - n_real, int(round(bs * cfg.real.camera_share)))
    n_sim = bs - n_real - n_cam
    data_seed = member_data_seed(cfg)
    size = cfg.data.patch_size
    objective = real_objective(cfg.real, real)
    inject = profile.layout() if cfg.real.inject_defects else None

    def step_loss(model: CDAE, first: int) -> torch.Tensor:
        sim = simulated_frames(cfg.data, data_seed, first, n_sim, [(size, size)]) if n_sim else []
        cam = camera_frames(profile, cfg.data, data_seed + CAMERA_STREAM, first, n_cam, size) if n_cam else []
        device = next(model.parameters()).device
        loss = torch.zeros((), device=device)
        frames = [f for f in sim + cam if informative(f)]
        if frames:
            loss = total_loss(model, make_batch(frames, cfg).to(device), cfg) * (len(frames) / bs)
        if n_real:
            rng = np.random.default_rng([cfg.seed, first, 23])
            batch = (noise2noise_batch(real, rng, n_real, size, inject, cfg.loss.defect_weight)
                     if objective == "noise2noise" else blind_spot_batch(real, rng, n_real, size, cfg.real, inject))
            loss = loss + cfg.real.loss_weight * (n_real / bs) * real_loss(model, batch, cfg)
        return loss

    return step_loss


@dataclass
class FinetuneResult:
    package: Path
    report: dict
    gate: dict | None = None


class FinetuneRefused(TrainingError):
    """The fine-tuned child is worse than its parent on the recording's held-out frames; it was not stored."""

    def __init__(self, reason: str, candidate: Path, report: dict) -> None:
        super().__init__(f"{reason} (the child and its report are in {candidate}, not in the model store; "
                         "--force keeps it, marked)")
        self.reason, self.candidate, self.report = reason, candidate, report


def _psnr_db(mse: float, adc_max: float) -> float:
    return 10 * math.log10(adc_max**2 / mse) if mse > 0 else math.inf


def judge(report: dict, profile: CameraProfile, gate: GateConfig, force: bool = False) -> dict:
    """The verdict on a fine-tune from its evaluation (``report`` of :func:`evaluate_recording` with ``compare``).

    ``accepted``: no rule fails; ``unverified``: no static held-out pairs, so the error against
    the scene cannot be estimated (only the defect and simulated rules were checked); ``refused``:
    a rule fails; ``forced``: a rule fails and ``force`` keeps it.
    """
    comp = report.get("comparison") or {}
    parent, child = comp.get("parent"), comp.get("child")
    adc_max = float(profile.adc_max)
    failures: list[str] = []
    for metric, c in (comp.get("metrics") or {}).items():
        allowed = gate.max_regression * max(c["parent_mse_dn2"], 0.0)
        if not math.isfinite(c["child_mse_dn2"]):
            failures.append("its output on the held-out frames is not finite")
            break
        if c["delta_low_dn2"] > allowed:
            what = ("estimated error on the held-out frames" if metric == "all"
                    else "estimated error on the scene's bright features")
            p, ch = c["parent_mse_dn2"], c["child_mse_dn2"]
            failures.append(f"{what}: {_psnr_db(p, adc_max):.2f} -> {_psnr_db(ch, adc_max):.2f} dB "
                            f"(RMS {math.sqrt(max(p, 0)):.3g} -> {math.sqrt(max(ch, 0)):.3g} DN; child - parent "
                            f"MSE >= {c['delta_low_dn2']:.3g} DN² at {gate.confidence:.0%})")
    real = report.get("summary", {})
    sizes = {"restored_dead": len(profile.dead_pixels), "restored_hot": len(profile.hot_pixels),
             "restored_stuck": len(profile.stuck_pixels), "line_offset_removed": 5 * len(profile.bad_lines)}
    if parent in real and child in real:
        for key, n in sizes.items():
            a, b = real[parent].get(key), real[child].get(key)
            if n < 5 or a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                continue
            # a share of n pixels moves by 1/n with one pixel: a drop counts beyond two binomial sigmas too
            noise = 2.0 * math.sqrt(max(a * (1.0 - a), 1.0 / n) / n)
            if b < a - max(gate.defect_drop, noise):
                failures.append(f"{key}: {a:.2f} -> {b:.2f} ({n} pixels)")
    sim = (report.get("simulated") or {}).get("summary") or {}
    if parent in sim and child in sim and sim[child]["psnr_db"] < sim[parent]["psnr_db"] - gate.sim_drop_db:
        failures.append(f"simulated held-out PSNR: {sim[parent]['psnr_db']:.2f} -> {sim[child]['psnr_db']:.2f} dB")
    rule = (f"refused if the {gate.confidence:.0%} one-sided paired-bootstrap lower bound (16x16 tiles, "
            f"{gate.resamples} resamples) of estimated MSE(child) - MSE(parent) on static held-out pairs exceeds "
            f"{gate.max_regression:g} x MSE(parent), on all kept pixels or on bright features; or a defect share "
            f"drops by more than {gate.defect_drop:g} and two binomial sigmas of its pixel count; or the simulated held-out PSNR drops by more than "
            f"{gate.sim_drop_db:g} dB")
    if failures:
        verdict = "forced" if force else "refused"
        reason = f"{child} is worse than its parent {parent}: " + "; ".join(failures)
    elif not comp.get("metrics"):
        verdict = "unverified"
        reason = ("no estimate of the error against the scene: "
                  + (report.get("no_estimate_reason") or "no static held-out pairs")
                  + "; only the defect and simulated checks were made")
    else:
        verdict, reason = "accepted", ""
    return {"verdict": verdict, "reason": reason, "failures": failures, "rule": rule}


def resolve_profile(recording: Path, profile_path: Path | str | None, log: Callable[[str], None]) -> tuple[CameraProfile, Path]:
    """The given profile, else the one beside the recording, else a fresh characterisation (saved there)."""
    path = Path(profile_path) if profile_path else default_profile_path(recording)
    if path.is_file():
        profile = load_profile(path)
        digest = sha256_file(recording)
        if profile.recording_sha256 != digest:
            log(f"note: {path} was measured on another recording ({profile.recording_sha256[:12]}…); using it as given")
        return profile, path
    if profile_path:
        raise CharacteriseError(f"{path}: no such camera profile")
    log(f"characterising the camera from {recording} → {path}")
    profile = characterise(recording)
    profile.save(path)
    return profile, path


def finetune(cfg: FinetuneConfig, recording: Path | str, profile: CameraProfile, profile_path: Path,
             models_root: Path | str, run_dir: Path | str | None = None, *, progress: bool = True,
             eval_frames: int = 16, log: Callable[[str], None] = print, command: str | None = None,
             force: bool = False) -> FinetuneResult:
    """Fine-tune ``cfg.init_from`` on ``recording``; judge it against its parent; store it if not worse.

    Raises :class:`FinetuneRefused` (the child left in ``run_dir/candidate``) if it is worse and
    not ``force``.
    """
    from cdae.engine.inference import Denoiser
    from cdae.training.evaluate_real import evaluate_recording, write_report

    recording = Path(recording)
    models_root = Path(models_root)
    if cfg.init_from is None:
        raise TrainingError("fine-tuning needs a parent model (--init NAME:VERSION)")
    parent_pkg = Path(cfg.init_from)
    if not (parent_pkg / "manifest.json").is_file():
        parent_pkg = ModelRegistry(models_root).resolve(cfg.init_from)
    final = models_root / cfg.name / cfg.version
    if final.exists():
        raise TrainingError(f"package {cfg.name}:{cfg.version} already exists at {final}")
    run_dir = Path(run_dir) if run_dir else Path("runs") / f"{cfg.name}-{cfg.version}"
    staging = run_dir / "candidate"
    shutil.rmtree(staging / cfg.name / cfg.version, ignore_errors=True)  # a refused child of an earlier run
    real = load_real_frames(recording, profile, cfg)
    log(f"{len(real.train)} training frames ({len(real.pairs)} static pairs: {real_objective(cfg.real, real)}), "
        f"{sum(len(h) for h in real.held_out)} held out; "
        f"profile: {len(profile.bad_lines)} bad lines, {int((~real.valid).sum())} known defect pixels, "
        f"read noise {profile.read_noise_dn:.2f} DN, gain {profile.gain_e_per_dn or float('nan'):.3g} e-/DN")
    provenance = DataProvenance(path=str(recording), sha256=sha256_file(recording), bytes=recording.stat().st_size,
                                source=profile.source, frames_train=len(real.train),
                                frames_held_out=sum(len(h) for h in real.held_out),
                                camera_profile_sha256=sha256_file(profile_path))
    train_cfg = cfg if Path(cfg.init_from) == parent_pkg else cfg.model_copy(update={"init_from": str(parent_pkg)})
    result = train(train_cfg, staging, run_dir, progress=progress, log=log,
                   command=command or shlex.join(["cdae", *sys.argv[1:]]),
                   step_loss=make_step_loss(cfg, profile, real), manifest_fields={"data": [provenance]})
    pkg = result.package
    (pkg / PROFILE_FILE).write_text(profile.model_dump_json(indent=1) + "\n")
    parent, child = Denoiser.from_package(parent_pkg), Denoiser.from_package(pkg)
    report = evaluate_recording([(parent.manifest.ref, parent), (child.manifest.ref, child)], real.held_out,
                                profile, pkg / "real-evaluation", sim_data=cfg.data, sim_frames=eval_frames,
                                sim_size=cfg.data.val_size, log=log, compare=(parent.manifest.ref, child.manifest.ref),
                                confidence=cfg.gate.confidence, resamples=cfg.gate.resamples)
    gate = judge(report, profile, cfg.gate, force=force)
    report["gate"] = gate
    write_report(pkg / "real-evaluation", report)
    manifest = read_manifest(pkg)
    summary = {"real_held_out": report["summary"], "sim_held_out": report["simulated"]["summary"],
               "real_objective": real_objective(cfg.real, real), "finetune_gate": gate}
    notes = manifest.notes
    if gate["verdict"] != "accepted":
        notes = (notes + "\n" if notes else "") + f"FINE-TUNE {gate['verdict'].upper()}: {gate['reason']}"
    write_manifest(pkg, manifest.model_copy(update={"metrics": {**manifest.metrics, **summary}, "notes": notes}))
    if gate["verdict"] == "refused":
        log(f"REFUSED: {gate['reason']}")
        raise FinetuneRefused(gate["reason"], pkg, report)
    if gate["verdict"] != "accepted":
        log(f"WARNING: fine-tune {gate['verdict']}: {gate['reason']}")
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(pkg), str(final))
    return FinetuneResult(final, report, gate)
