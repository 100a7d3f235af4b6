"""``cdae train``, ``finetune``, ``fuse``, ``calibrate``, ``evaluate``, ``simulate``: making models and judging them."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdae.cli._common import _err, _models_dir, print_summaries


def cmd_train(args: argparse.Namespace) -> int:
    from cdae.training.config import load_train_config
    from cdae.training.train import train

    cfg = load_train_config(args.config, args.set)
    updates: dict[str, object] = {}
    if args.name:
        updates["name"] = args.name
    if args.model_version:
        updates["version"] = args.model_version
    if args.init:
        updates["init_from"] = args.init
    cfg = cfg.model_copy(update=updates)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.seed]
    models = _models_dir(args.out)
    for seed in seeds:
        member = cfg.model_copy(update={"seed": seed, "version": f"{cfg.version}-s{seed}" if args.seeds else cfg.version})
        member = type(cfg).model_validate(member.model_dump())
        print(f"training {member.name}:{member.version} (seed {seed}) → {models}", flush=True)
        print("effective config: " + member.model_dump_json(), flush=True)
        run_dir = Path(args.run_dir) / f"{member.name}-{member.version}" if args.run_dir else None
        result = train(member, models, run_dir, resume=args.resume, progress=not args.no_progress)
        if args.compare:
            status = _compare_rerun(args.compare, result.package)
            if status:
                return status
    return 0


def _compare_rerun(reference: str, package: Path) -> int:
    """``cdae train --compare``: the verdict of a re-run against the run it should reproduce."""
    from cdae.engine.package import read_manifest
    from cdae.training.environment import compare_run, recorded_run

    try:
        recorded = recorded_run(reference)
    except LookupError as e:
        print(f"--compare {reference}: {e}", flush=True)
        return 0
    verdict = compare_run(recorded, read_manifest(package).model_dump(mode="json"))
    print(f"compared with {reference}: {verdict}", flush=True)
    return 0 if verdict.ok else 1


def cmd_finetune(args: argparse.Namespace) -> int:
    from cdae.engine.package import ModelRegistry
    from cdae.training.finetune import FinetuneRefused, finetune, finetune_config, resolve_profile

    src = Path(args.init)
    parent = src if (src / "manifest.json").is_file() else ModelRegistry(_models_dir(args.models_dir)).resolve(args.init)
    store = Path(args.out) if args.out else parent.parent.parent
    cfg = finetune_config(parent, args.config, args.set, name=args.name, version=args.model_version, store=store)
    recording = Path(args.data)
    profile, profile_path = resolve_profile(recording, args.profile, log=print)
    print(f"fine-tuning {cfg.name}:{cfg.version} from {parent} on {recording}", flush=True)
    print("effective config: " + cfg.model_dump_json(), flush=True)
    run_dir = Path(args.run_dir) / f"{cfg.name}-{cfg.version}" if args.run_dir else None
    try:
        result = finetune(cfg, recording, profile, profile_path, store, run_dir, progress=not args.no_progress,
                          eval_frames=args.eval_frames, force=args.force)
    except FinetuneRefused as e:
        print_summaries(e.report["summary"])
        _err(f"cdae finetune: refused: {e}")
        return 1
    print_summaries(result.report["summary"])
    if result.gate and result.gate["verdict"] != "accepted":
        _err(f"cdae finetune: warning: {result.gate['verdict']}: {result.gate['reason']}")
    print(f"wrote {result.package}")
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from cdae.engine.package import ModelRegistry
    from cdae.training.fuse import fuse

    models = _models_dir(args.models_dir)
    registry = ModelRegistry(models)
    pkgs = [registry.resolve(r) for r in args.members.split(",")]
    pkg = fuse(pkgs, args.mode, models, args.name, args.model_version, force=args.force)
    print(f"wrote {pkg}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import math

    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry
    from cdae.training.calibrate import calibrate_package

    if not 0 < args.alpha < 1 or args.frames < 1:
        _err("cdae calibrate: error: --alpha must lie in (0, 1) and --frames be at least 1")
        return 2
    pkg = ModelRegistry(_models_dir(args.models_dir)).resolve(args.model or DEFAULT_MODEL)
    if args.delta is not None and not 0 <= args.delta < 1:
        _err("cdae calibrate: error: --delta must lie in [0, 1) (0: alpha in expectation)")
        return 2
    if args.delta == 0:
        args.delta = None
    c = calibrate_package(pkg, frames=args.frames, alpha=args.alpha, delta=args.delta)
    conf = "" if args.delta is None else f" with confidence {1 - args.delta:.0%}"
    if c.defect_threshold is None:
        need = int(1 / args.alpha) if args.delta is None else int(math.log(1 / args.delta) / args.alpha) + 1
        print(f"{pkg}: no threshold keeps the risk bound at alpha {args.alpha:g}{conf} on {c.frames} frames "
              f"(at least {need} frames are needed for any); the head will flag nothing")
        return 1
    print(f"{pkg}: defect threshold {c.defect_threshold:.4f} (alpha {args.alpha:g}{conf}, {c.frames} frames: "
          f"risk bound {c.risk_bound:.2e}, mean share of "
          f"real bright pixels flagged {c.mean_loss:.2e}, worst frame {c.worst_frame_loss:.2e}; real pixels flagged "
          f"{c.real_pixels_flagged:.2e}, defect pixels {c.defect_pixels_flagged:.3f})")
    return 0


def _evaluate_recording(args: argparse.Namespace, models: list, pkg: Path, data: object) -> int:
    """``cdae evaluate --data run.h5``: the models on a camera recording's frames, without ground truth."""
    from cdae.recording import read_runs
    from cdae.training.characterise import default_profile_path, load_profile
    from cdae.training.evaluate_real import evaluate_recording, held_out_frames

    recording = Path(args.data)
    profile = load_profile(args.profile or default_profile_path(recording))
    last = args.held_out_frames or max(2, max(r.info.frames for r in read_runs(recording)) // 4)
    out = Path(args.out) if args.out else pkg / f"evaluation-{recording.stem}"
    report = evaluate_recording(models, held_out_frames(recording, profile, last), profile, out, sim_data=data,
                                sim_frames=args.frames)
    print_summaries(report["summary"])
    return 0


def _g(v: object) -> str:
    return "-" if v is None else format(v, ".2g")


def _evaluate_real(args: argparse.Namespace, ref: str, pkg: Path) -> int:
    """``cdae evaluate --real``: the model on real photographs that packages ship, through the project's camera."""
    from cdae.training.real_scenes import MissingRealImages, evaluate_real_scenes

    out = Path(args.out) if args.out else pkg / "evaluation" / "real-scenes"
    try:
        report = evaluate_real_scenes(ref, pkg, out, psf_sigma_px=args.real_psf)
    except MissingRealImages as e:
        raise SystemExit(str(e)) from e
    for name, t in report["targets"].items():
        print(f"{name}: meets all {t['meets_all']}; painted-over frames {t['frames_painted_over']}, "
              + (f"real bright pixels flagged {t['bright_flag_share_noise_only']:.2g} (calibrated rate "
                 f"{t['calibrated_rate']:g}), " if t.get("calibrated_rate") is not None else "")
              + f"false flags {_g(t['false_flag_share_noise_only'])} (reference {_g(t['false_flag_reference'])}), "
              "defect / median "
              + ", ".join(f"{c} {v:.2f}x" for c, v in t["defect_ratio_to_median_by_class"].items()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry, read_manifest
    from cdae.training.evaluate import evaluate, held_out_data, record_held_out

    registry = ModelRegistry(_models_dir(args.models_dir))
    pkgs = [registry.resolve(r) for r in args.model or [DEFAULT_MODEL]]
    if args.real:
        return _evaluate_real(args, read_manifest(pkgs[0]).ref, pkgs[0])
    denoisers = [Denoiser.from_package(p) for p in pkgs]
    names = [d.manifest.ref for d in denoisers]
    data = held_out_data(denoisers[0].manifest, args.model_distribution, args.set)
    if args.data:
        return _evaluate_recording(args, list(zip(names, denoisers)), pkgs[0], data)
    out = Path(args.out) if args.out else pkgs[0] / "evaluation"
    sizes = [tuple(int(v) for v in s.lower().split("x"))[::-1] for s in args.sizes.split(",")]
    report = evaluate(list(zip(names, denoisers)), out, data, frames=args.frames, val_frames=args.val_frames,
                      sizes=sizes, timing=not args.no_timing, overrides=args.set, bad_pixel_maps=args.bad_pixel_maps)
    for name, c in report["comparisons"].items():
        s = report["methods"][name]["summary"]
        print(f"{name}: PSNR {s['psnr_db']:.2f} dB ({c['psnr_gain_over_best_baseline_db']:+.2f} dB vs "
              f"{report['best_baseline']}), defect RMSE {c['defect_rmse_ratio_best_baseline_over_model']:.2f}x better, "
              f"bright RMSE {c['bright_rmse_model_over_noisy']:.3f} of noisy; targets met: {c['meets_targets']} "
              f"(in {c['bootstrap']['share_meeting_all']:.0%} of {c['bootstrap']['resamples']} bootstrap resamples)")
    if args.update_manifest:  # the model under evaluation only: the others are its comparisons
        record_held_out(pkgs[0], report, names[0])
        print(f"recorded held-out metrics in {pkgs[0] / 'manifest.json'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cdae.training.simulate import save_gallery

    save_gallery(args.output, seed=args.seed)
    print(f"wrote {args.output}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a CDAE on simulated frames; writes a model package")
    t.add_argument("--config", help="TOML/YAML/JSON training config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.epochs=5")
    t.add_argument("--seeds", help="comma-separated seeds: train one ensemble member per seed (version-sN)")
    t.add_argument("--name")
    t.add_argument("--model-version")
    t.add_argument("--init", help="fine-tune from this package (NAME:VERSION or directory)")
    t.add_argument("--out", help="model store (default: $CDAE_MODELS or the source tree's models/)")
    t.add_argument("--run-dir", help="folder for checkpoints and logs (default runs/)")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--compare", metavar="PACKAGE",
                   help="a recorded package (directory or NAME:VERSION) this run should reproduce: says whether it is "
                        "bit for bit (same environment) or within tolerance (another one); exit 1 if neither")
    t.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="fine-tune a model on a camera recording (self-supervised) + simulated data")
    ft.add_argument("--init", required=True, help="parent model NAME:VERSION (or package directory)")
    ft.add_argument("--data", required=True, help="the recording (cdae record)")
    ft.add_argument("--profile", help="camera profile (default: beside the recording; measured there if missing)")
    ft.add_argument("--config", help="TOML/YAML/JSON overrides of the fine-tuning config")
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.epochs=4")
    ft.add_argument("--name", help="model name (default: the parent's)")
    ft.add_argument("--model-version", help="version (default: PARENTVERSION-ftN)")
    ft.add_argument("--models-dir", help="store holding the parent (default: $CDAE_MODELS or the source tree's models/)")
    ft.add_argument("--out", help="store to write the new version to (default: the parent's store)")
    ft.add_argument("--run-dir", help="folder for checkpoints and logs (default runs/)")
    ft.add_argument("--eval-frames", type=int, default=16, help="simulated held-out frames for the before/after check")
    ft.add_argument("--force", action="store_true",
                    help="store the child even if it is worse than its parent on the held-out frames (marked so)")
    ft.add_argument("--no-progress", action="store_true")
    ft.set_defaults(func=cmd_finetune)

    f = sub.add_parser("fuse", help="fuse ensemble members (weight average, greedy soup, or output average)")
    f.add_argument("--members", required=True, help="comma-separated NAME:VERSION list")
    f.add_argument("--mode", choices=["params", "greedy", "outputs"], default="greedy")
    f.add_argument("--name", required=True)
    f.add_argument("--model-version", required=True)
    f.add_argument("--models-dir")
    f.add_argument("--force", action="store_true", help="average weights even without a common parent")
    f.set_defaults(func=cmd_fuse)

    cal = sub.add_parser("calibrate", help="calibrate a model's defect head for the guard (conformal risk control on "
                         "validation frames); writes guard-calibration.json beside its manifest")
    cal.add_argument("--model", help="NAME[:VERSION] (default: the shipped model)")
    cal.add_argument("--models-dir")
    cal.add_argument("--frames", type=int, default=4800,
                     help="simulated validation frames (default 4800: about 7 minutes on 2 cores)")
    cal.add_argument("--alpha", type=float, default=0.001,
                     help="expected share of a frame's real bright-feature pixels the head may flag (default 0.001)")
    cal.add_argument("--delta", type=float, default=0.1,
                     help="hold alpha with confidence 1 - delta over the calibration frames (default 0.1: 90 %%; needs "
                          "about log(1 / delta) / alpha frames); 0: alpha in expectation (conformal risk control, "
                          "about 1 / alpha frames)")
    cal.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("evaluate", help="held-out evaluation against tuned median/Gaussian baselines")
    e.add_argument("--model", action="append", help="NAME[:VERSION]; repeat to compare (default: the shipped model)")
    e.add_argument("--models-dir")
    e.add_argument("--frames", type=int, default=192,
                   help="held-out frames (a pooled RMSE is decided by rare scenes: too few frames and it jumps)")
    e.add_argument("--val-frames", type=int, default=48, help="validation frames the baselines are tuned on")
    e.add_argument("--sizes", default="256x256,320x192", help="WxH list the held-out frames cycle through")
    e.add_argument("--out", help="report folder (default: <package>/evaluation)")
    e.add_argument("--update-manifest", action="store_true",
                   help="record the held-out metrics in the (first) model's manifest")
    e.add_argument("--no-timing", action="store_true", help="skip the 1024x1024 CPU timing")
    e.add_argument("--bad-pixel-maps", action="store_true",
                   help="also score each model with its camera's bad-pixel map, found from simulated darks and flats")
    e.add_argument("--model-distribution", action="store_true",
                   help="held-out frames from the first model's training distribution (default: the standard one)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the held-out distribution, e.g. scene.plasma_psf_sigma_px=[0,0] (generator 1.1 scenes)")
    e.add_argument("--data", help="a camera recording (cdae record): evaluate on its frames, without ground truth")
    e.add_argument("--profile", help="camera profile of --data (default: beside the recording, from cdae characterise)")
    e.add_argument("--held-out-frames", type=int, help="with --data: the last N frames of each run (default: a quarter)")
    e.add_argument("--real", action="store_true",
                   help="real photographs that installed packages ship (pip install 'cdae[real]'), through the project's "
                        "camera, noise only and with defects (default --out: <package>/evaluation/real-scenes)")
    e.add_argument("--real-psf", type=float, default=0.5, metavar="SIGMA_PX",
                   help="with --real: the camera optics' Gaussian PSF sigma in pixels (0: the photos' pixels as they are)")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("simulate", help="write a PNG gallery of simulated scenes and detector defects")
    s.add_argument("-o", "--output", default="simulated.png")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_simulate)
