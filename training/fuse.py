"""Fuse ensemble members into one model package.

- ``params``: average the members' weights. Only meaningful between members that share a
  starting point (fine-tuned from one parent, or snapshots along one run): independently
  initialised networks sit in different basins and their weight average is garbage, so this
  mode refuses members without a common parent unless forced.
- ``greedy``: a greedy soup (Wortsman et al. 2022): members sorted by validation PSNR, each added
  to the weight average only if the validation PSNR improves.
- ``outputs``: keep every member and average their outputs (works for any members; costs N
  forward passes at inference).
The CDAE has no BatchNorm, so no statistics need recomputing after averaging.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cdae.engine.inference import Denoiser
from cdae.engine.package import EnsembleSpec, Manifest, code_version, instantiate, load_package, write_package
from cdae.training.config import DataConfig, recorded_data_config
from cdae.training.dataset import simulated_frames
from cdae.training.metrics import EvalFrame, psnr
from cdae.training.report import write_markdown_table

FuseMode = Literal["params", "greedy", "outputs"]


class FuseError(ValueError):
    """Members cannot be fused in the requested way."""


def average_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise FuseError("members have different parameter sets; cannot average weights")
    return {k: torch.stack([s[k].float() for s in states]).mean(dim=0) for k in keys}


def val_psnr(manifest: Manifest, state: dict[str, torch.Tensor], frames: Sequence[EvalFrame]) -> float:
    den = Denoiser(manifest, instantiate(manifest, state))
    scores = []
    for fr in frames:
        out, _ = den.denoise_dn(fr.noisy, float(fr.adc_max))
        scores.append(psnr(np.clip(out, 0, fr.adc_max), fr.clean, fr.adc_max))
    return float(np.mean(scores))


def fuse(
    member_pkgs: Sequence[Path],
    mode: FuseMode,
    models_root: Path | str,
    name: str,
    version: str,
    *,
    val_frames: int = 24,
    val_size: int = 128,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Fuse packages into ``models_root/name/version``; writes ``fuse_report.md/json`` beside it."""
    if len(member_pkgs) < 2:
        raise FuseError(f"fusing needs at least 2 members, got {len(member_pkgs)}")
    loaded = [load_package(p) for p in member_pkgs]
    manifests = [m for m, _ in loaded]
    states = [s for _, s in loaded]
    arch = manifests[0].architecture
    if any(m.architecture != arch for m in manifests[1:]):
        raise FuseError("members have different architectures: " + ", ".join(m.ref for m in manifests))
    if any(m.normalisation != manifests[0].normalisation for m in manifests[1:]):
        raise FuseError("members normalise their inputs differently; cannot fuse")
    if any(m.ensemble.mode == "output_average" for m in manifests):
        raise FuseError("members must be single models, not output-averaging ensembles")
    parents = {m.parent for m in manifests}
    if mode in ("params", "greedy") and (None in parents or len(parents) != 1) and not force:
        raise FuseError(
            "weight averaging needs members fine-tuned from one parent (their manifests name parents "
            f"{sorted(str(p) for p in parents)}); independently initialised networks sit in different basins. "
            "Use --mode outputs, or --force to average anyway."
        )

    data = recorded_data_config(manifests[0]) or DataConfig()
    frames = simulated_frames(data, data.val_seed, 10_000, val_frames, [(val_size, val_size)])
    member_scores = {m.ref: val_psnr(m, s, frames) for m, s in zip(manifests, states)}
    for ref, sc in member_scores.items():
        log(f"member {ref}: validation PSNR {sc:.2f} dB")

    refs = [m.ref for m in manifests]
    if mode == "outputs":
        fused_state = {f"members.{i}.{k}": v for i, s in enumerate(states) for k, v in s.items()}
        ensemble = EnsembleSpec(mode="output_average", members=len(states), member_refs=refs)
        used = refs
    else:
        if mode == "params":
            used_idx = list(range(len(states)))
        else:
            order = sorted(range(len(states)), key=lambda i: -member_scores[refs[i]])
            used_idx = [order[0]]
            best = member_scores[refs[order[0]]]
            for i in order[1:]:
                trial = average_state([states[j] for j in used_idx + [i]])
                sc = val_psnr(manifests[0], trial, frames)
                log(f"greedy soup: adding {refs[i]} gives {sc:.2f} dB (best so far {best:.2f})")
                if sc > best:
                    used_idx.append(i)
                    best = sc
        fused_state = average_state([states[i] for i in used_idx])
        used = [refs[i] for i in used_idx]
        ensemble = EnsembleSpec(mode="parameter_average", members=len(used), member_refs=used)

    fused_manifest = manifests[0].model_copy(update={"ensemble": ensemble})
    probe = fused_manifest.model_copy(update={"name": name, "version": version})
    fused_score = val_psnr(probe, fused_state, frames)
    log(f"fused ({mode}, {len(used)} members): validation PSNR {fused_score:.2f} dB")
    metrics = {"val_psnr_db": fused_score, "member_val_psnr_db": member_scores, "fuse_mode": mode}
    pkg = write_package(
        models_root, name=name, version=version, state_dict=fused_state, architecture=arch,
        normalisation=manifests[0].normalisation, ensemble=ensemble, seed=None,
        data_generator_version=manifests[0].data_generator_version, code_version=code_version(),
        command=shlex.join(["cdae", *sys.argv[1:]]), training_config=manifests[0].training_config,
        parent=manifests[0].parent, metrics=metrics, overwrite=True,
        notes=f"fused from {', '.join(refs)} by {mode}",
    )
    report = {"mode": mode, "members": member_scores, "used": used, "fused_val_psnr_db": fused_score,
              "best_member_val_psnr_db": max(member_scores.values()),
              "validation": {"seed": data.val_seed, "frames": val_frames, "size": val_size}}
    (pkg / "fuse_report.json").write_text(json.dumps(report, indent=2))
    rows = [{"model": r, "val_psnr_db": s, "in fused": "yes" if r in used else "no"} for r, s in member_scores.items()]
    rows.append({"model": f"fused ({mode})", "val_psnr_db": fused_score, "in fused": ""})
    (pkg / "fuse_report.md").write_text(
        f"# Fused model {name}:{version}\n\nMode: {mode}. Validation: {val_frames} frames of "
        f"{val_size}x{val_size}, seed {data.val_seed}.\n\n" + write_markdown_table(rows, ["model", "val_psnr_db", "in fused"])
    )
    return pkg
