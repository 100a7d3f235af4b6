"""Reproducible CDAE training on simulated diagnostic frames.

Same config + seed + thread count → bit-identical weights on CPU: data are generated from
(seed, index) alone, torch runs with deterministic algorithms, and checkpoints hold the complete
optimiser state (as safetensors + JSON, never pickle) so that a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from cdae.engine.architecture import CDAE
from cdae.engine.normalise import frame_offset_scale, network_input
from cdae.engine.package import ModelRegistry, code_version, load_package, write_package
from cdae.training.baselines import make_baseline
from cdae.training.config import TrainConfig
from cdae.training.dataset import simulated_frames
from cdae.training.environment import training_environment
from cdae.training.defects import mask_subclass
from cdae.training.metrics import EvalFrame, bright_feature_mask, psnr
from cdae.training.report import save_loss_curves
from cdae.training.simulate import GENERATOR_VERSION

LOSS_CSV = "loss.csv"
LOSS_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "val_psnr_db", "lr", "seconds"]
#: With ``optim.ema_decay`` set, ``val_loss`` and ``val_psnr_db`` are the averaged weights' (what is handed on and
#: shipped) and these the optimiser's own, for the log.
RAW_COLUMNS = ["val_loss_raw", "val_psnr_raw_db"]


#: ``(model, first frame index of the batch) -> loss``: one optimisation step's objective.
StepLoss = Callable[[CDAE, int], torch.Tensor]


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad init package, corrupt checkpoint, ...)."""


def member_data_seed(cfg: TrainConfig) -> int:
    """The training data stream of one ensemble member (members differ in init and data order)."""
    return cfg.data.train_seed * 1000 + cfg.seed


@dataclass
class Batch:
    x: torch.Tensor  # (B, 2, H, W) network input
    target: torch.Tensor  # (B, 1, H, W) clean frame, normalised like the input
    weight: torch.Tensor  # (B, 1, H, W) per-pixel loss weight
    defect: torch.Tensor  # (B, 1, H, W) 1 on defect pixels

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(*(t.to(device, non_blocking=True) for t in (self.x, self.target, self.weight, self.defect)))


def make_batch(frames: Sequence[EvalFrame], cfg: TrainConfig) -> Batch:
    xs, ts, ws, ds = [], [], [], []
    for fr in frames:
        x, offset, scale = network_input(fr.noisy, float(fr.adc_max), cfg.normalisation)
        xs.append(x)
        ts.append(((fr.clean - offset) / scale).astype(np.float32)[None])
        defect = fr.defect_mask != 0
        w = 1.0 + cfg.loss.bright_weight * bright_feature_mask(fr.clean, fr.defect_mask, 0.98)
        w = w + cfg.loss.defect_weight * defect
        for name, extra in cfg.loss.class_weights.items():
            w = w + extra * mask_subclass(fr.defect_mask, name)
        ws.append(w.astype(np.float32)[None])
        ds.append(defect.astype(np.float32)[None])
    x = torch.from_numpy(np.stack(xs))
    if cfg.architecture.in_channels == 1:
        x = x[:, :1]
    return Batch(x, torch.from_numpy(np.stack(ts)), torch.from_numpy(np.stack(ws)), torch.from_numpy(np.stack(ds)))


def restoration_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    err = pred - target
    if cfg.loss.kind == "mse":
        per_px = err * err
    elif cfg.loss.kind == "l1":
        per_px = err.abs()
    else:
        per_px = torch.sqrt(err * err + cfg.loss.charbonnier_eps**2)
    return (per_px * weight).sum() / weight.sum()


def total_loss(model: CDAE, batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    """Restoration loss in the network's compressed space, plus the defect head's cross entropy."""
    restored, logit = model.forward_compressed(batch.x)
    loss = restoration_loss(restored, model.compress(batch.target), batch.weight, cfg)
    if cfg.loss.linear_weight > 0:
        loss = loss + cfg.loss.linear_weight * restoration_loss(model.expand(restored), batch.target, batch.weight, cfg)
    if cfg.architecture.defect_head and cfg.loss.defect_bce_weight > 0:
        if cfg.loss.defect_bce_pixel_weights:
            bce = F.binary_cross_entropy_with_logits(logit, batch.defect, reduction="none")
            bce = (bce * batch.weight).sum() / batch.weight.sum()
        else:
            bce = F.binary_cross_entropy_with_logits(logit, batch.defect)
        loss = loss + cfg.loss.defect_bce_weight * bce
    return loss


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def training_device(cfg: TrainConfig) -> torch.device:
    """The configured device, or a TrainingError that says why it cannot be used."""
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise TrainingError(f"device {cfg.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {cfg.device!r}: this torch build or machine has no CUDA GPU; use device=cpu")
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"device {cfg.device!r}: training runs on 'cpu' or 'cuda[:N]'")
    return device


def set_determinism(cfg: TrainConfig) -> None:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    if torch.device(cfg.device).type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic kernels; a GPU run is still not bit-identical
        # to a CPU run, nor across GPU models.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        deterministic_algorithms()


def deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True)`` for eager ops, without its import of torch._inductor (2 s
    of CPU in every training process, for torch.compile's setting, which training does not use). Where torch
    lacks the flag's own setter, the public call."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor" in sys.modules:  # inductor loaded: keep its setting in step
        torch.use_deterministic_algorithms(True)
        return
    setter(True, warn_only=False)


@torch.no_grad()
def validate(model: CDAE, frames: Sequence[EvalFrame], cfg: TrainConfig) -> tuple[float, float]:
    """Mean loss (normalised units) and mean PSNR (dB against the ADC range) on the validation set."""
    model.eval()
    device = next(model.parameters()).device
    losses, psnrs = [], []
    for i in range(0, len(frames), cfg.optim.batch_size):
        chunk = frames[i : i + cfg.optim.batch_size]
        batch = make_batch(chunk, cfg).to(device)
        losses.append(total_loss(model, batch, cfg).item() * len(chunk))
        restored, _ = model(batch.x)
        for fr, r in zip(chunk, restored[:, 0].float().cpu().numpy()):
            offset, scale = frame_offset_scale(fr.noisy, float(fr.adc_max), cfg.normalisation)  # as make_batch's
            est = np.clip(r * scale + offset, 0, fr.adc_max)
            psnrs.append(psnr(est, fr.clean, fr.adc_max))
    model.train()
    return sum(losses) / len(frames), float(np.mean(psnrs))


def reference_psnr(frames: Sequence[EvalFrame]) -> dict[str, float]:
    """Mean PSNR of the untouched input and of a 3x3 median on the validation frames (for the log)."""
    med = make_baseline("median3")
    return {
        "noisy": float(np.mean([psnr(f.noisy, f.clean, f.adc_max) for f in frames])),
        "median3": float(np.mean([psnr(med(f.noisy, f.adc_max), f.clean, f.adc_max) for f in frames])),
    }


class WeightAverage:
    """The exponential moving average of a model's weights (``optim.ema_decay``), kept as a second model.

    After each optimiser step ``t`` (counted within the stage from 0) every parameter moves as
    ``avg += (1 - d) * (w - avg)`` with ``d = min(ema_decay, (1 + t) / (10 + t))``: early steps weigh more, so the
    average does not remember the random start. Buffers are copied. Plain float arithmetic in a fixed order, so a
    CPU run stays bit-reproducible, and the average is checkpointed, so a resumed run equals an uninterrupted one."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    def update(self, model: nn.Module, t: int) -> None:
        d = min(self.decay, (1.0 + t) / (10.0 + t))
        with torch.no_grad():
            for avg, w in zip(self.model.parameters(), model.parameters(), strict=True):
                avg.lerp_(w, 1.0 - d)
            for avg, b in zip(self.model.buffers(), model.buffers(), strict=True):
                avg.copy_(b)


# --- checkpoints: safetensors for tensors, JSON for the rest (no pickle) -----------------------

def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int,
                    average: nn.Module | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in average.state_dict().items()})
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_file(tensors, str(path / "checkpoint.safetensors.tmp"))
    (path / "checkpoint.safetensors.tmp").replace(path / "checkpoint.safetensors")
    meta = {"epoch": epoch, "step": step, "param_groups": sd["param_groups"]}
    (path / "checkpoint.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    average: nn.Module | None = None) -> tuple[int, int]:
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
        tensors = load_file(str(path / "checkpoint.safetensors"))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: cannot read checkpoint ({e})") from e
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    kept = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    if (average is not None) != bool(kept):
        has, asks = ("no", "asks for one") if average is not None else ("a", "asks for none")
        raise TrainingError(f"{path}: the checkpoint has {has} weight average and optim.ema_decay {asks} (it was "
                            f"written by a run with another config): resume with the config it was made with")
    if average is not None:
        average.load_state_dict(kept)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["epoch"]), int(meta["step"])


# --- the run -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    package: Path
    val_loss: float
    val_psnr_db: float
    seconds: float


def _init_weights(model: nn.Module, cfg: TrainConfig, models_root: Path) -> str | None:
    if cfg.init_from is None:
        return None
    src = Path(cfg.init_from)
    pkg = src if (src / "manifest.json").is_file() else ModelRegistry(models_root).resolve(cfg.init_from)
    manifest, state = load_package(pkg)
    if manifest.architecture != cfg.architecture:
        raise TrainingError(f"init package {manifest.ref} has architecture {manifest.architecture}, config asks {cfg.architecture}")
    model.load_state_dict(state, strict=True)
    return manifest.ref


def _train_stage(
    cfg: TrainConfig,
    model: CDAE,
    device: torch.device,
    run_dir: Path,
    csv_path: Path,
    *,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
    step_loss: StepLoss | None,
    budget: int | None,
    epoch_offset: int,
    step_offset: int,
    stage: str | None,
    t0: float,
    raw_columns: bool = False,
) -> dict[str, object]:
    """One stage (or the whole of an unstaged run): its optimiser, schedule, checkpoints and validation."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = cfg.data.frames_per_epoch // cfg.optim.batch_size
    total_steps = steps_per_epoch * cfg.optim.epochs

    val_frames = simulated_frames(cfg.data, cfg.data.val_seed, 0, cfg.data.val_frames, [(cfg.data.val_size,) * 2])
    reference = reference_psnr(val_frames)
    log("validation references: " + ", ".join(f"{k} {v:.2f} dB" for k, v in reference.items()))
    start_epoch, step = 0, 0
    average = WeightAverage(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    if resume and (run_dir / "checkpoint.json").is_file():
        start_epoch, step = load_checkpoint(run_dir, model, opt, average.model if average else None)
        log(f"resumed {run_dir} at epoch {start_epoch}, step {step}")

    data_seed = member_data_seed(cfg)
    val_loss = val_psnr = float("nan")
    end_epoch = cfg.optim.epochs if budget is None else min(cfg.optim.epochs, budget)
    s0 = time.perf_counter()
    for epoch in range(start_epoch, end_epoch):
        running, n = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not progress, leave=False)
        for b in bar:
            first = (epoch * steps_per_epoch + b) * cfg.optim.batch_size
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, cfg)
            if step_loss is None:
                frames = simulated_frames(cfg.data, data_seed, first, cfg.optim.batch_size, [(cfg.data.patch_size,) * 2])
                loss = total_loss(model, make_batch(frames, cfg).to(device), cfg)
            else:
                loss = step_loss(model, first)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            if average is not None:
                average.update(model, step)
            step += 1
            running += loss.item()
            n += 1
            bar.set_postfix(loss=f"{running / n:.4f}")
        raw = ["", ""]
        if average is not None:
            raw = list(validate(model, val_frames, cfg))
            val_loss, val_psnr = validate(average.model, val_frames, cfg)
        else:
            val_loss, val_psnr = validate(model, val_frames, cfg)
        row = [epoch_offset + epoch + 1, step_offset + step, running / max(n, 1), val_loss, val_psnr,
               lr_at(step - 1, total_steps, cfg), round(time.perf_counter() - t0, 1)]
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow(row + (raw if raw_columns else []) + ([stage] if stage else []))
        log(f"epoch {epoch + 1}/{cfg.optim.epochs}: train {running / max(n, 1):.4f}  val {val_loss:.4f}  "
            f"val PSNR {val_psnr:.2f} dB" + (f" (averaged; the optimiser's own {raw[1]:.2f} dB)" if average else ""))
        save_checkpoint(run_dir, model, opt, epoch + 1, step, average.model if average else None)
    if average is not None:  # the average goes on (a stage stopped early: into the package; the checkpoint keeps both)
        model.load_state_dict(average.model.state_dict())
    if math.isnan(val_loss):  # resumed at the end: nothing trained in this call
        val_loss, val_psnr = validate(model, val_frames, cfg)
    out: dict[str, object] = {"epochs": cfg.optim.epochs, "steps": step, "val_loss": val_loss,
                              "val_psnr_db": val_psnr, "reference": reference,
                              "seconds": round(time.perf_counter() - s0, 1)}
    if average is not None:
        out["ema_decay"] = cfg.optim.ema_decay
    return out


def train(
    cfg: TrainConfig,
    models_root: Path | str = "models",
    run_dir: Path | str | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = print,
    step_loss: StepLoss | None = None,
    manifest_fields: dict[str, object] | None = None,
) -> TrainResult:
    """Train one model and write it as a package ``models_root/<name>/<version>``.

    ``run_dir`` holds checkpoints and logs (default ``runs/<name>-<version>``); ``resume`` continues
    from its last checkpoint. ``stop_after_epochs`` ends early, counted over all stages (used to
    test resumption). A staged config (``cfg.stages``) trains its stages in order on one model, each
    with its own optimiser, schedule and checkpoint folder (``run_dir/stage-N-NAME``).
    ``step_loss(model, first)`` replaces the simulated batch's loss (``first``: index of the batch's
    first frame in the run; fine-tuning mixes in real frames this way); ``manifest_fields`` go into
    the package's manifest.
    """
    models_root = Path(models_root)
    run_dir = Path(run_dir) if run_dir else Path("runs") / f"{cfg.name}-{cfg.version}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    device = training_device(cfg)
    set_determinism(cfg)
    t0, cpu0 = time.perf_counter(), time.process_time()
    code = code_version()  # the code that starts the run is the code that made the weights

    model = CDAE(cfg.architecture)
    parent = _init_weights(model, cfg, models_root)
    model.to(device)
    model.train()
    stages = cfg.stage_configs()
    csv_path = run_dir / LOSS_CSV
    raw_columns = any(s.optim.ema_decay > 0 for s in stages)
    columns = LOSS_COLUMNS + (RAW_COLUMNS if raw_columns else []) + (["stage"] if cfg.stages else [])
    if resume and csv_path.is_file():
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), [])
        if header and header != columns:
            raise TrainingError(f"{csv_path}: its columns ({','.join(header)}) are not this config's "
                                f"({','.join(columns)}): resume with the config the run was started with")
    else:
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(columns)

    done_epochs = done_steps = 0
    records: list[dict[str, object]] = []
    for i, scfg in enumerate(stages):
        name = cfg.stages[i].name if cfg.stages else None
        budget = None if stop_after_epochs is None else stop_after_epochs - done_epochs
        if budget is not None and budget <= 0:
            break
        stage_dir = run_dir / f"stage-{i + 1}-{name}" if name else run_dir
        stage_dir.mkdir(parents=True, exist_ok=True)
        if name:
            log(f"stage {i + 1}/{len(stages)} {name!r}: {scfg.optim.epochs} epochs, lr {scfg.optim.lr:g}")
        rec = _train_stage(scfg, model, device, stage_dir, csv_path, resume=resume, progress=progress, log=log,
                           step_loss=step_loss, budget=budget, epoch_offset=done_epochs, step_offset=done_steps,
                           stage=name, t0=t0, raw_columns=raw_columns)
        records.append({"name": name, **rec})
        done_epochs += scfg.optim.epochs
        done_steps += int(rec["steps"])
    if not records:
        raise TrainingError(f"stop_after_epochs={stop_after_epochs}: nothing to train")
    last = records[-1]
    val_loss, val_psnr, reference = float(last["val_loss"]), float(last["val_psnr_db"]), last["reference"]
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    save_loss_curves(run_dir / "loss.png", csv_path)
    metrics: dict[str, object] = {
        "val_loss": val_loss, "val_psnr_db": val_psnr, **{f"val_{k}_psnr_db": v for k, v in reference.items()},
        "train_seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
        "epochs": sum(s.optim.epochs for s in stages), "steps": done_steps,
    }
    if cfg.stages:
        metrics["stages"] = [{k: v for k, v in r.items() if k != "reference"} for r in records]
    pkg = write_package(
        models_root,
        name=cfg.name,
        version=cfg.version,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        architecture=cfg.architecture,
        normalisation=cfg.normalisation,
        overwrite=True,
        seed=cfg.seed,
        data_generator_version=GENERATOR_VERSION,
        code_version=code,
        command=command or shlex.join(["cdae", *sys.argv[1:]]),
        training_config=json.loads(cfg.model_dump_json()),
        metrics=metrics,
        environment=training_environment(cfg.threads, cfg.device),
        parent=parent,
        **(manifest_fields or {}),
    )
    for name in (LOSS_CSV, "loss.png"):
        if (run_dir / name).is_file():
            (pkg / name).write_bytes((run_dir / name).read_bytes())
    log(f"wrote {pkg} (val PSNR {val_psnr:.2f} dB, {seconds:.0f} s)")
    return TrainResult(pkg, val_loss, val_psnr, seconds)
