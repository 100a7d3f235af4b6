"""The ``cdae`` command line: thin subcommands over the packages' functions.

Heavy imports (torch, the simulator) happen inside each subcommand, so ``cdae --help`` and the
IOC's commands stay light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn
from pathlib import Path

from cdae import __version__
from cdae.engine.kinds import BACKEND_KINDS


def _models_dir(arg: str | None) -> Path:
    from cdae.engine.config import default_models_dir

    return Path(arg) if arg else default_models_dir()


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _usage_error(msg: str) -> NoReturn:
    """A wrong combination of flags: one line, exit status 2 (as argparse does)."""
    _err(msg)
    raise SystemExit(2)


# --- train -------------------------------------------------------------------------------------

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
    """``cdae train --compare``: the verdict of a re-run against the package (or the JSON record of a run:
    ``weights_sha256``, ``metrics``, ``environment``) it should reproduce."""
    import json

    from cdae.engine.package import ModelRegistry, read_manifest
    from cdae.training.environment import compare_run

    ref = Path(reference)
    if ref.is_file() and ref.suffix == ".json":
        recorded = json.loads(ref.read_text())
    elif (ref / "manifest.json").is_file():
        recorded = read_manifest(ref).model_dump(mode="json")
    elif "/" in reference or ref.exists():
        print(f"--compare {reference}: no package or run record there to compare with", flush=True)
        return 0
    else:
        try:
            recorded = read_manifest(ModelRegistry(_models_dir(None)).resolve(reference)).model_dump(mode="json")
        except Exception as e:  # noqa: BLE001 - the message says what is missing
            print(f"--compare {reference}: no recorded package to compare with ({e})", flush=True)
            return 0
    verdict = compare_run(recorded, read_manifest(package).model_dump(mode="json"))
    print(f"compared with {reference}: {verdict}", flush=True)
    return 0 if verdict.ok else 1


# --- evaluate ----------------------------------------------------------------------------------

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
    for name, s in report["summary"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()))
    return 0


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
              f"false flags {t['false_flag_share_noise_only']}, defect / median "
              + ", ".join(f"{c} {v:.2f}x" for c, v in t["defect_ratio_to_median_by_class"].items()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry, read_manifest, write_manifest
    from cdae.training.config import DataConfig, recorded_data_config, with_overrides
    from cdae.training.evaluate import evaluate

    registry = ModelRegistry(_models_dir(args.models_dir))
    refs = args.model or [DEFAULT_MODEL]
    pkgs = [registry.resolve(r) for r in refs]
    if args.real:
        return _evaluate_real(args, read_manifest(pkgs[0]).ref, pkgs[0])
    denoisers = [Denoiser.from_package(p) for p in pkgs]
    names = [d.manifest.ref for d in denoisers]
    # The standard held-out set (default scene and detector distributions, seeds disjoint from
    # training) unless asked for the first model's own training distribution: versions trained
    # on different distributions are only comparable on the same frames.
    own = recorded_data_config(denoisers[0].manifest) if args.model_distribution else None
    data = own or DataConfig()
    # --set, e.g. scene.plasma_psf_sigma_px=[0,0]: the held-out frames of generator 1.1
    data = with_overrides(data, args.set, "held-out data")
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
        for pkg, name in zip(pkgs[:1], names[:1]):
            m = read_manifest(pkg)
            held_out = {"summary": report["methods"][name]["summary"], "comparison": report["comparisons"][name],
                        "best_baseline": report["best_baseline"],
                        "best_baseline_summary": report["methods"][report["best_baseline"]]["summary"],
                        "noisy_summary": report["methods"]["noisy input"]["summary"],
                        "held_out": report["held_out"],
                        "cpu_1024x1024_uint16_seconds": report["cpu_1024x1024_uint16_seconds"].get(name)}
            write_manifest(pkg, m.model_copy(update={"metrics": {**m.metrics, "held_out": held_out}}))
            print(f"recorded held-out metrics in {pkg / 'manifest.json'}")
    return 0


# --- fuse --------------------------------------------------------------------------------------

def cmd_fuse(args: argparse.Namespace) -> int:
    from cdae.engine.package import ModelRegistry
    from cdae.training.fuse import fuse

    models = _models_dir(args.models_dir)
    registry = ModelRegistry(models)
    pkgs = [registry.resolve(r) for r in args.members.split(",")]
    pkg = fuse(pkgs, args.mode, models, args.name, args.model_version, force=args.force)
    print(f"wrote {pkg}")
    return 0


# --- denoise -----------------------------------------------------------------------------------

def cmd_calibrate(args: argparse.Namespace) -> int:
    import math

    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry
    from cdae.training.calibrate import calibrate_package

    if not 0 < args.alpha < 1 or args.frames < 1:
        _err("cdae calibrate: error: --alpha must lie in (0, 1) and --frames be at least 1")
        return 2
    pkg = ModelRegistry(_models_dir(args.models_dir)).resolve(args.model or DEFAULT_MODEL)
    if args.delta is not None and not 0 < args.delta < 1:
        _err("cdae calibrate: error: --delta must lie in (0, 1)")
        return 2
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


def cmd_denoise(args: argparse.Namespace) -> int:
    from cdae.engine.badpixels import BadPixelError, BadPixelMap
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry

    bad_pixels = None
    if args.bad_pixels:
        try:
            bad_pixels = BadPixelMap.load(args.bad_pixels)
        except BadPixelError as e:
            _err(f"cdae denoise: error: {e}")
            return 2
    from cdae.engine.guard import GuardConfig

    if args.defect_map and not (args.guard or args.guard_k is not None):
        _err("cdae denoise: error: --defect-map needs --guard (the flags are the guard's)")
        return 2
    guard = GuardConfig(**({} if args.guard_k is None else {"k_sigma": args.guard_k})) \
        if args.guard or args.guard_k is not None else None
    registry = ModelRegistry(_models_dir(args.models_dir))
    denoiser = Denoiser.from_package(registry.resolve(args.model or DEFAULT_MODEL), guard=guard)
    print(f"model {denoiser.manifest.ref}" + (f", {len(bad_pixels)} listed bad pixels" if bad_pixels else ""),
          file=sys.stderr)
    from cdae.training.denoise import denoise_files

    written, errors = denoise_files(args.inputs, args.output, denoiser, args.bit_depth, error=_err,
                                    bad_pixels=bad_pixels, defect_map=args.defect_map)
    print(f"{len(written)} written, {len(errors)} failed", file=sys.stderr)
    return 1 if errors else 0


# --- badpixels ---------------------------------------------------------------------------------

def cmd_badpixels(args: argparse.Namespace) -> int:
    """Find a camera's bad pixels from dark frames and/or flat fields; write an NDPluginBadPixel file."""
    import numpy as np

    from cdae.engine.badpixels import BadPixelError, BadPixelMap
    from cdae.training.characterise import find_bad_pixels
    from cdae.training.fileio import FileFormatError, read_image

    def stack(specs: list[str] | None) -> np.ndarray | None:
        if not specs:
            return None
        frames = []
        for spec in specs:
            a = read_image(spec)
            frames.extend(a if a.ndim == 3 else [a])
        return np.stack([np.asarray(f, dtype=np.float32) for f in frames])

    if sum(bool(v) for v in (args.profile, args.darks or args.flats, args.from_ioc)) > 1:
        _err("cdae badpixels: error: give one of a camera profile, darks/flats or --from-ioc")
        return 2
    if args.from_ioc:  # the live map a filter IOC learned from the camera's frames (camera health)
        from cdae.health import HealthError, map_from_image
        from cdae.ioc.health import read_from_ioc

        try:
            image, _ = read_from_ioc(args.from_ioc)
            bp = map_from_image(image, source=f"{args.from_ioc}HealthMap")
        except (HealthError, OSError, TimeoutError) as e:
            _err(f"cdae badpixels: error: {e}")
            return 2
        bp.save(args.output)
        print(f"{args.output}: {len(bp)} bad pixels of {image.size} (the live map of {args.from_ioc})")
        return 0
    try:
        if args.profile:  # the defect map `cdae characterise` measured from a `cdae record` recording
            from cdae.training.characterise import load_profile

            mask = load_profile(args.profile).defect_mask() != 0
            how = f"from the camera profile {args.profile}"
        else:
            darks, flats = stack(args.darks), stack(args.flats)
            mask, counts = find_bad_pixels(darks, flats, k=args.sigma, dead_fraction=args.dead_fraction)
            how = (f"{counts['hot']} hot from {0 if darks is None else len(darks)} darks, {counts['dead']} dead from "
                   f"{0 if flats is None else len(flats)} flats")
    except (BadPixelError, FileFormatError, OSError, ValueError) as e:
        _err(f"cdae badpixels: error: {e}")
        return 2
    bp = BadPixelMap.from_mask(mask, half=args.median_half_width)
    bp.save(args.output)
    print(f"{args.output}: {len(bp)} bad pixels of {mask.size} ({how})")
    return 0


# --- health ------------------------------------------------------------------------------------

def cmd_health(args: argparse.Namespace) -> int:
    """A camera-health report (map, counts over time, first-seen list) from a recording or a live IOC."""
    import datetime as dt

    from cdae.health import HealthConfig, HealthError
    from cdae.healthreport import archiver_history, from_recording, history_from_rows, write_report

    if bool(args.recording) == bool(args.from_ioc):
        _usage_error("cdae health: error: give a recording or --from-ioc P (one of them)")
    try:
        config = HealthConfig()
        if args.name:
            site = _site(args, "health")
            config = site.ioc_config(args.name).health
        if args.window:
            config = config.model_copy(update={"window_frames": args.window})
        if args.recording:
            tracker = from_recording(args.recording, config)
            image, doc = tracker.map_image(), tracker.pixel_list(history=0)
            history = history_from_rows(tracker.history)
            summary = {"source": str(args.recording), "history_source": f"the recording's {tracker.windows} windows"}
        else:
            from cdae.ioc.health import read_from_ioc

            image, doc = read_from_ioc(args.from_ioc)
            history, where = {}, ""
            if args.archiver:
                now = dt.datetime.now(dt.timezone.utc)
                history = archiver_history(args.archiver, args.from_ioc, now - dt.timedelta(hours=args.hours), now)
                where = f"the archiver {args.archiver}, last {args.hours:g} h" if history else ""
            if not history:
                history = history_from_rows(doc.get("history", []))  # type: ignore[arg-type]
                where = (f"the IOC's last {len(doc.get('history', []))} windows"  # type: ignore[arg-type]
                         + (" (the archiver had none)" if args.archiver else ""))
            summary = {"source": args.from_ioc, "history_source": where}
        written = write_report(args.output, image, doc, history, summary)
    except (HealthError, OSError, TimeoutError, ValueError) as e:
        _err(f"cdae health: error: {e}")
        return 2
    print(f"{args.output}: {', '.join(p.name for p in written)} ({len(doc.get('pixels', []))} pixels, "  # type: ignore[arg-type]
          f"{len(doc.get('lines', []))} lines; counts from {summary['history_source']})")  # type: ignore[arg-type]
    return 0


# --- simulate ----------------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    from cdae.training.simulate import save_gallery

    save_gallery(args.output, seed=args.seed)
    print(f"wrote {args.output}")
    return 0


# --- compare (offline) and demo (live) ---------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from cdae.demo import run_compare

    w, h = (int(v) for v in args.size.lower().split("x"))
    run_compare(args.output, args.model, Path(args.models_dir) if args.models_dir else None, args.frames, (h, w))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cdae.demo import DemoConfig, run_live_demo

    fields = {k: getattr(args, k) for k in ("output", "model", "models_dir", "size", "rate", "data_type",
                                            "backend", "seconds", "prefix", "bit_depth") if getattr(args, k) is not None}
    try:
        config = DemoConfig.model_validate(fields)
    except ValueError as e:
        _err(f"cdae demo: error: {e}")
        return 2
    return run_live_demo(config)


# --- export and the model store ------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from cdae.deploy.export import export_package
    from cdae.engine.package import ModelRegistry

    if args.to == "triton":
        return _export_triton(args)
    if args.output or len(args.model or []) > 1 or args.site:
        _usage_error("-o, --site and more than one --model are for --to triton")
    args.model = args.model[0] if args.model else "cdae-default"
    pkg = ModelRegistry(_models_dir(args.models_dir)).resolve(args.model)
    record = export_package(pkg, args.to, fp16=args.fp16, frames=args.frames, device=args.device,
                            max_side=args.max_side, opt_side=args.opt_side, log=_err)
    if record.kind == "torch-bf16":
        print(f"{pkg.name}: bf16 on this CPU reproduces fp32 (parity and held-out quality passed), recorded in "
              f"{pkg}/manifest.json")
    else:
        print(f"wrote {pkg / record.path} (sha256 {record.sha256[:12]}, parity passed), recorded in {pkg}/manifest.json")
    return 0


def _export_triton(args: argparse.Namespace) -> int:
    from cdae.deploy.triton import InstancePlan, export_repository
    from cdae.engine.config import FramePathSettings
    from cdae.engine.package import ModelRegistry

    if not args.output:
        _usage_error("--to triton needs -o REPO (the Triton model repository to write)")
    registry = ModelRegistry(_models_dir(args.models_dir))
    packages = [registry.resolve(ref) for ref in (args.model or ["cdae-default"])]
    plan, settings = InstancePlan(), FramePathSettings(backend="torch-cpu")
    if args.site:
        from cdae.deploy.site import load_site

        site = load_site(args.site)
        section = site.triton_section(args.name)
        plan, settings = section.plan, section.frame_path
    tensorrt = None if args.tensorrt == "auto" else args.tensorrt == "yes"
    result = export_repository(packages, Path(args.output), settings=settings, plan=plan, onnx=not args.no_onnx,
                               tensorrt=tensorrt, frames=args.frames, log=_err)
    for name, versions in result.models.items():
        print(f"{result.repo / name}: versions {', '.join(map(str, versions))}")
    for note in result.notes:
        _err(note)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    import json

    from cdae.deploy.models import format_rows, store_rows

    rows = store_rows(_models_dir(args.models_dir))
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from cdae.engine.package import ModelRegistry, read_manifest

    pkg = ModelRegistry(_models_dir(args.models_dir)).resolve(args.model)
    m = read_manifest(pkg)
    if args.json:
        print(m.model_dump_json(indent=2))
        return 0
    held = m.metrics.get("held_out") or {}
    summary = held.get("summary", {}) if isinstance(held, dict) else {}
    print(f"{m.ref}  ({pkg})")
    print(f"  architecture  {m.architecture.model_dump_json()}")
    print(f"  parameters    {m.parameters}, weights {m.weights_bytes} bytes, sha256 {m.weights_sha256}")
    print(f"  made          {m.created_utc} by code {m.code_version}, seed {m.seed}, "
          f"generator {m.data_generator_version}, parent {m.parent or '-'}")
    print(f"  command       {m.command or '-'}")
    if summary:
        print("  held-out      " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    for a in m.artefacts:
        par = a.parity
        print(f"  artefact      {a.kind} {a.precision} {a.path} sha256 {a.sha256[:12]} parity "
              f"{'passed' if par.get('passed') else 'FAILED'} (max |Δ| {par.get('max_abs_dn')} DN)")
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    from cdae.deploy.models import verify_package
    from cdae.engine.package import ModelRegistry

    registry = ModelRegistry(_models_dir(args.models_dir))
    refs = args.models or registry.refs()
    if not refs:
        _err(f"no models in {registry.root}")
        return 1
    bad = 0
    for ref in refs:
        problems = verify_package(registry.resolve(ref))
        bad += bool(problems)
        print(f"{ref}: " + ("OK" if not problems else "FAILED\n  " + "\n  ".join(problems)))
    return 1 if bad else 0


def cmd_models_activate(args: argparse.Namespace) -> int:
    from cdae.engine.client import ControlClient

    endpoint = args.engine
    if args.config:
        from cdae.deploy.site import load_site

        if not args.name:
            _err("cdae models activate: error: --config needs --name ENGINE")
            return 2
        endpoint = load_site(args.config).engine_config(args.name).control_endpoint()
    if not endpoint:
        _err("cdae models activate: error: give --engine CONTROL_ENDPOINT or --config SITE --name ENGINE")
        return 2
    with ControlClient(endpoint, timeout_s=args.timeout) as ctl:
        reply = ctl.activate(args.model, wait=True, timeout_s=args.timeout)
    if not reply.ok:
        _err(f"cdae models activate: {args.model} refused: {reply.error} (the engine keeps its current model)")
        return 1
    print(f"{endpoint}: now serving {reply.result.get('model', args.model)}")
    return 0


# --- CURVE keys --------------------------------------------------------------------------------

def cmd_keys(args: argparse.Namespace) -> int:
    import shutil

    from cdae.engine.curve import make_key_pair
    from cdae.engine.errors import EngineError

    for name in args.names:
        try:
            public, secret = make_key_pair(Path(args.dir), name, overwrite=args.force)
        except (EngineError, OSError) as e:
            _err(f"cdae keys: error: {e}")
            return 1
        print(f"{name}: public {public}, secret {secret} (mode 0600)")
        if args.allow:
            Path(args.allow).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(public, Path(args.allow) / public.name)
            print(f"{name}: allowed by engines whose allowed_clients_dir is {args.allow}")
    return 0


# --- site configuration ------------------------------------------------------------------------

def cmd_config_check(args: argparse.Namespace) -> int:
    from cdae.deploy.site import check_site

    problems = check_site(args.file, check_models=not args.no_models)
    for problem in problems:
        print(f"{args.file}:{problem}")
    if problems:
        _err(f"{len(problems)} problem(s) in {args.file}")
        return 1
    print(f"{args.file}: OK")
    return 0


def cmd_config_epics_env(args: argparse.Namespace) -> int:
    from cdae.deploy.site import epics_env_file, load_site

    sys.stdout.write(epics_env_file(load_site(args.file)))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """The effective configuration each service of the site runs with, as JSON."""
    import json

    from cdae.deploy.site import load_site

    site = load_site(args.file)
    out: dict[str, object] = {
        "epics": site.epics.environment(),
        "engines": {n: json.loads(site.engine_config(n).model_dump_json()) for n in site.engines},
        "cameras": {n: json.loads(site.ioc_config(n).model_dump_json()) for n in site.cameras},
    }
    print(json.dumps(out, indent=2))
    return 0


# --- the EPICS side ----------------------------------------------------------------------------

def cmd_sim_camera(args: argparse.Namespace) -> int:
    from cdae.simcamera import CameraConfig, run_camera
    from cdae.ioc.runner import run_until_signalled

    fields: dict[str, object] = {"prefix": args.prefix}
    if args.size:
        w, h = (int(v) for v in args.size.lower().split("x"))
        fields.update(width=w, height=h)
    if args.max_size:
        w, h = (int(v) for v in args.max_size.lower().split("x"))
        fields.update(max_width=w, max_height=h)
    for key in ("rate_hz", "data_type", "bit_depth", "seed", "bank", "read_noise_e", "hot_column_offset_frac",
                "point_sigma_px"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.stopped:
        fields["acquire"] = False
    if args.static_scene:
        fields["static_scene"] = True
    if args.shutter_closed:
        fields["shutter_open"] = False
    if args.pva:
        from cdae.ioc.pva import p4p_missing

        missing = p4p_missing()
        if missing:
            _err(f"cdae sim-camera: error: --pva: {missing}")
            return 2
        fields["pva"] = True
    if args.hot_columns:
        fields["hot_columns"] = [int(x) for x in args.hot_columns.split(",")]
    if args.fresh_noise:
        fields["fresh_noise"] = True
    try:
        from cdae.simcamera import DamageEvent

        if args.damage:
            fields["damage"] = [DamageEvent.parse(spec) for spec in args.damage]
        if args.point_source:
            fields["point_sources"] = [tuple(float(v) for v in spec.split(",")) for spec in args.point_source]
        config = CameraConfig.model_validate(fields)
    except ValueError as e:
        _err(f"cdae sim-camera: error: {e}")
        return 2
    return run_until_signalled(lambda stop: run_camera(config, stop))


def _site(args: argparse.Namespace, kind: str):  # -> SiteConfig | None
    """The site file when ``--name`` is given (``--config`` is then a site file), else None."""
    if args.name is None:
        return None
    if args.config is None:
        _usage_error(f"cdae {kind}: error: --name needs --config SITE_FILE")
    from cdae.deploy.site import load_site

    return load_site(args.config)


def _apply_epics_env(site) -> None:  # site: SiteConfig
    """The site's EPICS settings, under what the environment already says (systemd's EnvironmentFile)."""
    import os

    for key, value in site.epics.environment().items():
        os.environ.setdefault(key, value)


def cmd_ioc(args: argparse.Namespace) -> int:
    from cdae.deploy.site import SiteError
    from cdae.ioc.filter import IocConfig, load_ioc_config, run_ioc
    from cdae.ioc.frames import IocError
    from cdae.ioc.runner import run_until_signalled

    overrides = {k: getattr(args, k) for k in ("source", "prefix", "engine", "control", "model", "width", "height",
                                               "data_type", "bit_depth", "queue_size", "max_elements",
                                               "engine_timeout_s", "bad_pixel_file")}
    if args.no_residual:
        overrides["residual"] = False
    if args.no_defect_map:
        overrides["defect_map"] = False
    if args.pva:
        overrides["pva"] = True
    try:
        site = _site(args, "ioc")
        if site is not None:
            _apply_epics_env(site)
            base = site.ioc_config(args.name).model_dump(exclude_unset=True)
            base.update({k: v for k, v in overrides.items() if v is not None})
            config = IocConfig.model_validate(base)
        else:
            config = load_ioc_config(args.config, overrides)
        config.control_endpoint()
        missing = config.pva_needed()
        if missing:  # PV Access asked for (--pva, a pva:// source) without p4p: say what to install
            raise IocError(f"{'--pva' if config.pva else '--source ' + config.source}: {missing}")
    except (ValueError, OSError, IocError, SiteError) as e:
        _err(f"cdae ioc: error: {e}")
        return 2
    return run_until_signalled(lambda stop: run_ioc(config, stop))


def cmd_record(args: argparse.Namespace) -> int:
    from cdae.ioc.record import RecordConfig, record
    from cdae.ioc.runner import run_until_signalled

    fields: dict[str, object] = {"source": args.source, "frames": args.frames, "output": args.output, "dark": args.dark,
                                 "camera_prefix": args.camera, "note": args.note}
    for key in ("bit_depth", "width", "height", "data_type"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.timeout is not None:
        fields.update(connect_timeout_s=args.timeout, frame_timeout_s=args.timeout)
    try:
        config = RecordConfig.model_validate(fields)
    except ValueError as e:
        _err(f"cdae record: error: {e}")
        return 2
    result = run_until_signalled(lambda stop: record(config, stop, progress=not args.no_progress))
    run = result.run
    if run is None:
        _err(f"cdae record: error: {result.error}")
        return 1
    kind = "dark frames" if run.dark else "frames"
    print(f"run {run.name} of {config.output}: {run.frames} {kind} {run.width}x{run.height} {run.data_type} "
          f"({run.bit_depth}-bit), UniqueIds skipped: {run.skipped_ids}")
    if result.error:
        _err(f"cdae record: stopped after {run.frames} of {config.frames} frames: {result.error}; "
             f"the {run.frames} recorded frames are kept")
        return 1
    return 0


def cmd_characterise(args: argparse.Namespace) -> int:
    from cdae.training.characterise import CharacteriseConfig, characterise, default_profile_path, save_profile_png
    from cdae.training.config import apply_override, validate_config

    settings: dict = {}
    for item in args.set:
        apply_override(settings, item)
    config = validate_config(CharacteriseConfig, settings, "characterisation")
    profile = characterise(args.recording, config, bit_depth=args.bit_depth)
    out = Path(args.output) if args.output else default_profile_path(args.recording)
    profile.save(out)
    png = save_profile_png(profile, args.recording, Path(args.png) if args.png else out.with_suffix(".png"))
    gain = f"{profile.gain_e_per_dn:.3g} e-/DN" if profile.gain_e_per_dn else "unknown"
    print(f"{profile.width}x{profile.height} {profile.bit_depth}-bit, {profile.frames_dark} dark + {profile.frames_light} "
          f"ordinary frames: bias {profile.bias_dn:.1f} DN, read noise {profile.read_noise_dn:.2f} DN, gain {gain}; "
          f"{len(profile.dead_pixels)} dead, {len(profile.hot_pixels)} hot, {len(profile.stuck_pixels)} stuck pixels, "
          f"{len(profile.bad_lines)} bad lines")
    for note in profile.notes:
        print(f"note: {note}")
    print(f"wrote {out} and {png}")
    return 0


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
        for name, s in e.report["summary"].items():
            print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()))
        _err(f"cdae finetune: refused: {e}")
        return 1
    for name, s in result.report["summary"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()))
    if result.gate and result.gate["verdict"] != "accepted":
        _err(f"cdae finetune: warning: {result.gate['verdict']}: {result.gate['reason']}")
    print(f"wrote {result.package}")
    return 0


# --- engine ------------------------------------------------------------------------------------

def cmd_engine(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cdae.engine.errors import EngineError
    from cdae.engine.config import EngineConfig
    from cdae.engine.server import run_engine

    from cdae.deploy.site import SiteError

    fields: dict[str, object] = {}
    for key in ("bind", "backend", "control", "model", "max_pixels", "tile_margin", "max_frame_pixels", "queue",
                "threads"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.models:
        fields["models_dir"] = Path(args.models)
    options: dict[str, object] = {}
    for key in ("device", "precision", "trt_max_side", "trt_opt_side"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.no_cuda_graphs:
        options["cuda_graphs"] = False
    if args.guard or args.guard_k is not None:
        fields["guard"] = {} if args.guard_k is None else {"k_sigma": args.guard_k}
    try:
        site = _site(args, "engine")
        base = site.engine_config(args.name).model_dump(exclude_unset=True) if site else {}
        base.update(fields)
        base["backend_options"] = {**dict(base.get("backend_options") or {}), **options}
        config = EngineConfig.model_validate(base)
    except (ValueError, SiteError) as e:  # pydantic's ValidationError: say which flag is wrong, no traceback
        _err(f"cdae engine: error: {e}")
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return run_engine(config, stop)
    except EngineError as e:
        _err(f"cdae engine: error: {e}")
        return 2


# --- operator display and archiving ------------------------------------------------------------

def _wxh(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def _camera_fields(args: argparse.Namespace, command: str) -> dict[str, object]:
    """prefix/source/... of a site file's camera (``--config FILE --name CAMERA``), else of the flags."""
    if args.config is None:
        if not args.prefix or not args.source and command == "display":
            _usage_error(f"cdae {command}: error: give --prefix and --source, or --config SITE --name CAMERA")
        return {}
    if not args.name:
        _usage_error(f"cdae {command}: error: --config needs --name CAMERA")
    from cdae.deploy.site import load_site

    cam = load_site(args.config).ioc_config(args.name)
    return {"prefix": args.prefix or cam.prefix, "source": args.source or cam.source,
            "source_array": cam.array_suffix, "source_is_waveform": args.source_is_waveform or cam.plain_waveform}


def cmd_display(args: argparse.Namespace) -> int:
    from cdae.deploy.display import DisplaySpec, write_display

    fields: dict[str, object] = {"prefix": args.prefix, "source": args.source,
                                 "source_is_waveform": args.source_is_waveform}
    fields.update(_camera_fields(args, "display"))
    if args.title:
        fields["title"] = args.title
    if args.residual_limit is not None:
        fields["residual_limit"] = args.residual_limit
    try:
        if args.image_size:
            fields["image_width"], fields["image_height"] = _wxh(args.image_size)
        spec = DisplaySpec.model_validate(fields)
        path = write_display(spec, args.output)
    except ModuleNotFoundError as e:
        _err(f"cdae display: error: {e.name} is not installed; pip install 'cdae[deploy]'")
        return 2
    except (ValueError, OSError) as e:
        _err(f"cdae display: error: {e}")
        return 2
    print(f"wrote {path} (macros P={spec.prefix} S={spec.source})")
    return 0


def cmd_archiver_pvs(args: argparse.Namespace) -> int:
    import json

    from cdae.deploy.archiver import ArchiverSpec, archiver_plan

    fields: dict[str, object] = {"prefix": args.prefix, "source": args.source, "images": args.images,
                                 "source_is_waveform": args.source_is_waveform}
    fields.update(_camera_fields(args, "archiver-pvs"))
    for key in ("frame_rate_hz", "image_period_s", "policy"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    try:
        if args.image_size:
            fields["image_size"] = _wxh(args.image_size)
        plan = archiver_plan(ArchiverSpec.model_validate(fields))
    except ValueError as e:
        _err(f"cdae archiver-pvs: error: {e}")
        return 2
    for warning in plan.warnings:
        _err(f"cdae archiver-pvs: warning: {warning}")
    text = json.dumps(plan.requests, indent=1) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {len(plan.requests)} PVs to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# --- systemd -----------------------------------------------------------------------------------

def cmd_systemd(args: argparse.Namespace) -> int:
    from pathlib import PurePosixPath

    import cdae.deploy
    from cdae.deploy.systemd import InstallError, UnitSettings, camera_engines, install, render_units, write_units

    fields = {k: getattr(args, k) for k in ("venv", "config", "user", "epics_env", "models_dir")
              if getattr(args, k) is not None}
    try:
        settings = UnitSettings.model_validate(fields)
    except ValueError as e:
        _err(f"cdae systemd {args.systemd_command}: error: {e}")
        return 2
    if args.systemd_command == "units":
        cameras = None
        if args.site_file:
            from cdae.deploy.site import load_site

            site = load_site(args.site_file)
            cameras = camera_engines(site)
            if args.models_dir is None:
                settings = settings.model_copy(update={"models_dir": site.models_dir})
        for path in write_units(Path(args.output), render_units(settings, cameras)):
            print(f"wrote {path}")
        return 0
    example = Path(args.example) if args.example else Path(cdae.deploy.__file__).parent / "site.example.toml"
    try:
        install(settings, unit_dir=PurePosixPath(args.unit_dir), destdir=Path(args.destdir) if args.destdir else None,
                example=example, models_from=Path(args.models_from) if args.models_from else None,
                enable=not args.no_enable)
    except InstallError as e:
        _err(f"cdae systemd install: error: {e}")
        return 1
    return 0


def _add_systemd_parsers(sub: argparse._SubParsersAction) -> None:
    sd = sub.add_parser("systemd", help="systemd units for the engines and filter IOCs; install them")
    sds = sd.add_subparsers(dest="systemd_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--venv", help="virtual environment the units run cdae from (default /opt/cdae/venv)")
    common.add_argument("--config", help="site file the units name (default /etc/cdae/site.toml)")
    common.add_argument("--user", help="service user and group (default cdae)")
    common.add_argument("--epics-env", help="the IOCs' EnvironmentFile (default /etc/cdae/epics.env)")
    common.add_argument("--models-dir", help="model store, read-only for the services (default: the site's)")
    su = sds.add_parser("units", parents=[common], help="write cdae.target, cdae-engine@.service, cdae-ioc@.service")
    su.add_argument("-o", "--output", required=True, help="folder for the unit files")
    su.add_argument("--site-file", help="read cameras and engines from this site file: per-camera ordering drop-ins")
    su.set_defaults(func=cmd_systemd)
    si = sds.add_parser("install", parents=[common],
                        help="create the user, put site file, EPICS env file, model store and units in place")
    si.add_argument("--destdir", help="stage everything below this folder; no useradd, no systemctl")
    si.add_argument("--unit-dir", default="/etc/systemd/system")
    si.add_argument("--example", help="site file installed when there is none (default deploy/site.example.toml)")
    si.add_argument("--models-from", help="seed an empty model store from this folder (install.sh: the shipped models/)")
    si.add_argument("--no-enable", action="store_true", help="do not enable the target and instances")
    si.set_defaults(func=cmd_systemd)


def _add_operator_parsers(sub: argparse._SubParsersAction) -> None:
    dp = sub.add_parser("display", help="write the operator's Phoebus display (.bob) of one filter IOC")
    dp.add_argument("--config", help="site file: take the camera's prefixes from it (with --name)")
    dp.add_argument("--name", help="camera name in the site file")
    dp.add_argument("--prefix", help="the filter IOC's output prefix (e.g. 13SIM1:CDAE1:)")
    dp.add_argument("--source", help="the source's NDStdArrays prefix (e.g. 13SIM1:image1:)")
    dp.add_argument("--source-is-waveform", action="store_true", help="--source is a plain waveform PV")
    dp.add_argument("-o", "--output", required=True, help="the .bob file to write")
    dp.add_argument("--title", help="window title (default: source → prefix)")
    dp.add_argument("--image-size", help="on-screen WxH of each image (default 400x400)")
    dp.add_argument("--residual-limit", type=float, help="fixed residual scale ±DN, white = 0 (default: autoscale)")
    dp.set_defaults(func=cmd_display)
    ap = sub.add_parser("archiver-pvs", help="the Archiver Appliance's archivePV JSON for one filter IOC")
    ap.add_argument("--config", help="site file: take the camera's prefixes from it (with --name)")
    ap.add_argument("--name", help="camera name in the site file")
    ap.add_argument("--prefix", help="the filter IOC's output prefix")
    ap.add_argument("--source", help="the source's NDStdArrays prefix: also archive the raw frame ids")
    ap.add_argument("--source-is-waveform", action="store_true", help="--source is a plain waveform PV")
    ap.add_argument("-o", "--output", help="JSON file to write (default: stdout)")
    ap.add_argument("--rate", dest="frame_rate_hz", type=float, help="camera frames per second (default 10)")
    ap.add_argument("--images", action="store_true", help="also archive raw/denoised/residual frames (large)")
    ap.add_argument("--image-period-s", type=float, help="one archived frame per this many seconds (default 60)")
    ap.add_argument("--image-size", help="WxH of the frames, for the storage estimate")
    ap.add_argument("--policy", help="appliance policy name for every PV (default: the appliance decides)")
    ap.set_defaults(func=cmd_archiver_pvs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdae", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"cdae {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

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

    cal = sub.add_parser("calibrate", help="calibrate a model's defect head for the guard (conformal risk control on "
                         "validation frames); writes guard-calibration.json beside its manifest")
    cal.add_argument("--model", help="NAME[:VERSION] (default: the shipped model)")
    cal.add_argument("--models-dir")
    cal.add_argument("--frames", type=int, default=192, help="simulated validation frames (default 192)")
    cal.add_argument("--alpha", type=float, default=0.01,
                     help="expected share of a frame's real bright-feature pixels the head may flag (default 0.01)")
    cal.add_argument("--delta", type=float,
                     help="hold alpha with confidence 1 - delta over the calibration frames (e.g. 0.1: 90 %%; needs "
                          "about log(1 / delta) / alpha frames); default: alpha in expectation")
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

    f = sub.add_parser("fuse", help="fuse ensemble members (weight average, greedy soup, or output average)")
    f.add_argument("--members", required=True, help="comma-separated NAME:VERSION list")
    f.add_argument("--mode", choices=["params", "greedy", "outputs"], default="greedy")
    f.add_argument("--name", required=True)
    f.add_argument("--model-version", required=True)
    f.add_argument("--models-dir")
    f.add_argument("--force", action="store_true", help="average weights even without a common parent")
    f.set_defaults(func=cmd_fuse)

    d = sub.add_parser("denoise", help="denoise .npy/.tif/.png/HDF5 (file.h5:/dataset) files")
    d.add_argument("inputs", nargs="+")
    d.add_argument("-o", "--output", required=True, help="output folder (file names are kept)")
    d.add_argument("--model", help="NAME[:VERSION] (default: the shipped model)")
    d.add_argument("--models-dir")
    d.add_argument("--bit-depth", type=int, help="camera bit depth when the container is wider (e.g. 12 in uint16)")
    d.add_argument("--bad-pixels", help="the camera's bad-pixel file (areaDetector NDPluginBadPixel JSON, e.g. from "
                   "cdae badpixels): listed pixels are filled in the denoised frames")
    d.add_argument("--guard", action="store_true", help="hold every output pixel to the camera's noise and flag every "
                   "pixel that moves further, with its class (see docs/design.md)")
    d.add_argument("--guard-k", type=float, help="with --guard: unflagged pixels move at most this many sigma (default 1)")
    d.add_argument("--defect-map", action="store_true", help="with --guard: write NAME.flags.tif (class per pixel) and "
                   "NAME.flags.png beside each output")
    d.set_defaults(func=cmd_denoise)

    bpx = sub.add_parser("badpixels", help="find a camera's hot and dead pixels from darks/flats; write an "
                         "NDPluginBadPixel file")
    bpx.add_argument("--darks", nargs="+", help="dark frames (no light, the exposure used): files or stacks")
    bpx.add_argument("--flats", nargs="+", help="flat fields (even light, well below saturation): files or stacks")
    bpx.add_argument("--profile", help="instead: the camera profile `cdae characterise` wrote for a recording")
    bpx.add_argument("--from-ioc", metavar="P", help="instead: the live map (camera health) of the filter IOC with "
                     "prefix P, read over Channel Access")
    bpx.add_argument("-o", "--output", required=True, help="bad-pixel JSON file to write")
    bpx.add_argument("--sigma", type=float, default=8.0,
                     help="hot: a pixel's median dark above the frame's by this many robust sigmas (default 8)")
    bpx.add_argument("--dead-fraction", type=float, default=0.5,
                     help="dead: flat response below this fraction of the local median (default 0.5)")
    bpx.add_argument("--median-half-width", type=int, default=1,
                     help="each pixel is filled with the median of its (2n+1)^2 box (default 1: 3x3)")
    bpx.set_defaults(func=cmd_badpixels)

    hl = sub.add_parser("health", help="camera-health report: the live bad-pixel map (PNG), counts over time, the "
                        "first frame each bad pixel was seen; from a recording or a running filter IOC")
    hl.add_argument("recording", nargs="?", help="a recording made by cdae record (its frames go through the rule)")
    hl.add_argument("--from-ioc", metavar="P", help="instead: the live map of the filter IOC with prefix P (CA)")
    hl.add_argument("--archiver", metavar="URL", help="with --from-ioc: counts over time from this Archiver Appliance "
                    "(e.g. http://archiver:17665); default: the IOC's last 256 windows")
    hl.add_argument("--hours", type=float, default=24.0, help="with --archiver: how far back (default 24)")
    hl.add_argument("--config", help="with --name: the site file whose [cameras.NAME.health] rule to use")
    hl.add_argument("--name", help="the camera in the site file")
    hl.add_argument("--window", type=int, help="frames per evidence window (default the rule's, 32)")
    hl.add_argument("-o", "--output", required=True, help="report folder")
    hl.set_defaults(func=cmd_health)

    s = sub.add_parser("simulate", help="write a PNG gallery of simulated scenes and detector defects")
    s.add_argument("-o", "--output", default="simulated.png")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_simulate)
    m = sub.add_parser("compare", help="offline: the model on simulated damaged frames, beside median/Gaussian filters")
    m.add_argument("-o", "--output", default="demo-out", help="folder for demo.png")
    m.add_argument("--model", help="NAME[:VERSION] (default: the shipped model)")
    m.add_argument("--models-dir")
    m.add_argument("--frames", type=int, default=6)
    m.add_argument("--size", default="512x512", help="WxH")
    m.set_defaults(func=cmd_compare)
    dm = sub.add_parser("demo", help="live: simulated camera → engine → filter IOC on loopback, with status and snapshot")
    dm.add_argument("-o", "--output", help="folder for the PNG snapshot (default demo-out)")
    dm.add_argument("--model", help="NAME[:VERSION] (default: the shipped model)")
    dm.add_argument("--models-dir")
    dm.add_argument("--size", help="camera WxH (default 512x512)")
    dm.add_argument("--rate", type=float, help="camera frames per second (default 5)")
    dm.add_argument("--data-type", choices=["UInt8", "UInt16", "Float32"])
    dm.add_argument("--bit-depth", type=int, help="camera ADC bits for UInt16/Float32 (default 12)")
    dm.add_argument("--backend", choices=BACKEND_KINDS)
    dm.add_argument("--prefix", help="PV prefix root (default 13SIM1:)")
    dm.add_argument("--seconds", type=float, help="run this long, then print a summary and exit")
    dm.set_defaults(func=cmd_demo)
    sc = sub.add_parser("sim-camera", help="an areaDetector-like CA IOC serving simulated damaged camera frames")
    sc.add_argument("--prefix", default="13SIM1:image1:")
    sc.add_argument("--size", help="WxH (default 512x512)")
    sc.add_argument("--max-size", help="largest WxH SizeX/SizeY may be set to (default: --size)")
    sc.add_argument("--rate", dest="rate_hz", type=float, help="frames per second (default 10)")
    sc.add_argument("--data-type", choices=["UInt8", "Int16", "UInt16", "Float32"])
    sc.add_argument("--bit-depth", type=int, choices=[12, 16], help="ADC bits of UInt16/Int16/Float32 frames")
    sc.add_argument("--seed", type=int, help="which camera (defect layout) and scenes")
    sc.add_argument("--bank", type=int, help="frames simulated once and cycled (default 4)")
    sc.add_argument("--stopped", action="store_true", help="start with Acquire = Done")
    sc.add_argument("--static-scene", action="store_true", help="one fixed scene; only the noise changes frame to frame")
    sc.add_argument("--read-noise-e", type=float, help="read noise (e- RMS) instead of the drawn camera's")
    sc.add_argument("--hot-columns", help="comma-separated x of extra hot columns (damage the camera got)")
    sc.add_argument("--hot-column-offset-frac", type=float, help="their offset, fraction of the span above bias (0.01)")
    sc.add_argument("--shutter-closed", action="store_true", help="start with the shutter closed (dark frames)")
    sc.add_argument("--fresh-noise", action="store_true", help="new noise and radiation in every frame (the bank's "
                    "scenes cycled): no noise outlier recurs as a defect would")
    sc.add_argument("--damage", action="append", metavar="KIND@FRAME[,key=value]",
                    help="run-time damage, e.g. hot_pixels@200,count=4  hot_column@300,x=30  dead_pixels@50  "
                    "stuck_pixels@50  radiation@100,frames=60,level=5000 (hits/Mpx/frame); repeatable")
    sc.add_argument("--point-source", action="append", metavar="X,Y,PEAK",
                    help="a static point source (peak in relative intensity, 1 = full well), blurred by the "
                    "camera's optics (--point-sigma); repeatable")
    sc.add_argument("--point-sigma", dest="point_sigma_px", type=float, help="the point sources' PSF sigma, px (0.7)")
    sc.add_argument("--pva", action="store_true", help="also serve frames as an NTNDArray on PREFIX Pva1:Image "
                    "(PV Access, like NDPluginPva; needs cdae[pva])")
    sc.set_defaults(func=cmd_sim_camera)
    rc = sub.add_parser("record", help="record raw frames (UniqueId, timestamps, camera metadata) from a live camera PV to HDF5")
    rc.add_argument("--source", required=True, help="camera image prefix (e.g. 13SIM1:image1:) or, with --width/--height, a waveform PV")
    rc.add_argument("--frames", type=int, required=True, help="frames to record")
    rc.add_argument("-o", "--output", required=True, help="recording file (.h5); an existing one gets a new run")
    rc.add_argument("--dark", action="store_true", help="the shutter is closed: flag these frames as darks")
    rc.add_argument("--camera", help="prefix of the camera's ADBase PVs for metadata (e.g. 13SIM1:cam1:; default: --source)")
    rc.add_argument("--bit-depth", type=int, help="camera ADC bits when the data type is wider (e.g. 12 in UInt16)")
    rc.add_argument("--width", type=int, help="plain waveform source: width")
    rc.add_argument("--height", type=int, help="plain waveform source: height")
    rc.add_argument("--data-type", help="plain waveform source: UInt8, Int16, UInt16, Int32, Float32, ...")
    rc.add_argument("--timeout", type=float, help="seconds to wait for the camera and for each frame (default 5 / 10)")
    rc.add_argument("--note", default="", help="what the camera looked at (kept with the run)")
    rc.add_argument("--no-progress", action="store_true")
    rc.set_defaults(func=cmd_record)
    ch = sub.add_parser("characterise", help="camera profile from a recording: defect map, bias, read noise, gain (+ PNG)")
    ch.add_argument("recording", help="a recording made by cdae record (dark runs help)")
    ch.add_argument("-o", "--output", help="profile JSON (default: beside the recording, NAME.profile.json)")
    ch.add_argument("--png", help="defect-map picture (default: the profile's name with .png)")
    ch.add_argument("--bit-depth", type=int, help="ADC bits, if the recording does not know them")
    ch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="threshold, e.g. pixel_sigma=6")
    ch.set_defaults(func=cmd_characterise)
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
    io = sub.add_parser("ioc", help="the filter IOC: camera PV in, engine, denoised areaDetector-style PVs out")
    io.add_argument("--config", help="TOML file with IocConfig fields, or with --name a site file (flags override it)")
    io.add_argument("--name", help="camera name in the site file ([cameras.NAME])")
    io.add_argument("--source", help="source prefix (e.g. 13SIM1:image1:), with --width/--height a waveform PV, or "
                    "pva://CHANNEL: a camera's NTNDArray over PV Access (pva://13SIM1:Pva1: reads 13SIM1:Pva1:Image)")
    io.add_argument("--prefix", help="output prefix (e.g. 13SIM1:CDAE1:)")
    io.add_argument("--engine", help="engine data endpoint(s), comma-separated (default tcp://127.0.0.1:5555)")
    io.add_argument("--control", help="engine control endpoint (default: engine port + 1)")
    io.add_argument("--model", help="NAME:VERSION to activate at start")
    io.add_argument("--width", type=int, help="plain waveform source: width")
    io.add_argument("--height", type=int, help="plain waveform source: height")
    io.add_argument("--data-type", help="plain waveform source: UInt8, Int16, UInt16, Int32, Float32, ...")
    io.add_argument("--bit-depth", type=int, help="camera ADC bits when the container is wider (e.g. 12)")
    io.add_argument("--queue-size", type=int, help="frames in flight to the engine (default 2)")
    io.add_argument("--max-elements", type=int, help="ArrayData length (default: the source's)")
    io.add_argument("--engine-timeout-s", type=float, help="no reply within this: the engine counts as down")
    io.add_argument("--bad-pixel-file", help="the camera's bad-pixel file (NDPluginBadPixel JSON, e.g. from cdae "
                    "badpixels): filled in the denoised frame; the BadPixelFile PV changes it at run time")
    io.add_argument("--no-residual", action="store_true", help="do not publish Residual:ArrayData")
    io.add_argument("--no-defect-map", action="store_true", help="do not publish DefectMap:ArrayData")
    io.add_argument("--pva", action="store_true", help="also serve the images over PV Access as NTNDArray: PREFIX "
                    "Pva1:Image, Pva1:Residual, Pva1:DefectMap (p4p: pip install 'cdae[pva]')")
    io.set_defaults(func=cmd_ioc)
    x = sub.add_parser("export", help="export a model to ONNX, a TensorRT plan, a Triton model repository or "
                       "checked BF16 on the CPU, verified against torch")
    x.add_argument("--model", action="append", help="NAME[:VERSION] (default: the shipped model); --to triton: "
                   "repeat for more versions")
    x.add_argument("--to", required=True, choices=["onnx", "tensorrt", "torch-bf16", "triton"],
                   help="torch-bf16: check the weights in BF16 on this CPU against FP32 and record it; the engine's "
                   "torch-cpu backend then runs them in BF16 (precision auto)")
    x.add_argument("-o", "--output", help="--to triton: the model repository to write (or add versions to)")
    x.add_argument("--site", help="--to triton: site file whose [triton.NAME] gives instance groups and settings")
    x.add_argument("--name", help="--to triton: the [triton.NAME] section of --site (default: the only one)")
    x.add_argument("--no-onnx", action="store_true", help="--to triton: the frame path only, no NAME-net model")
    x.add_argument("--tensorrt", choices=["auto", "yes", "no"], default="auto",
                   help="--to triton: NAME-net-trt plans (auto: where TensorRT and a GPU are)")
    x.add_argument("--fp16", action="store_true", help="TensorRT: FP16 plan (pointwise frame path kept in FP32)")
    x.add_argument("--models-dir")
    x.add_argument("--frames", type=int, default=8, help="simulated frames of the parity check")
    x.add_argument("--device", default="cuda:0", help="TensorRT: GPU to build on")
    x.add_argument("--max-side", type=int, default=2048, help="largest frame side (larger frames are tiled)")
    x.add_argument("--opt-side", type=int, default=1024, help="TensorRT: side the plan is tuned for")
    x.set_defaults(func=cmd_export)
    ms = sub.add_parser("models", help="the model store: list, show, verify; activate on a running engine")
    mss = ms.add_subparsers(dest="models_command", required=True)
    ml = mss.add_parser("list", help="every package in the store")
    ml.add_argument("--models-dir")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=cmd_models_list)
    mw = mss.add_parser("show", help="how a model was made, its metrics and artefacts")
    mw.add_argument("model", help="NAME[:VERSION]")
    mw.add_argument("--models-dir")
    mw.add_argument("--json", action="store_true", help="the whole manifest")
    mw.set_defaults(func=cmd_models_show)
    mv = mss.add_parser("verify", help="check sha256 of weights and artefacts (all packages by default)")
    mv.add_argument("models", nargs="*", help="NAME[:VERSION] (default: all)")
    mv.add_argument("--models-dir")
    mv.set_defaults(func=cmd_models_verify)
    ma = mss.add_parser("activate", help="switch a running engine to a model (hot swap, no frame lost)")
    ma.add_argument("model", help="NAME[:VERSION]")
    ma.add_argument("--engine", help="the engine's control endpoint, e.g. tcp://127.0.0.1:5556")
    ma.add_argument("--config", help="site file (with --name ENGINE)")
    ma.add_argument("--name", help="engine name in the site file")
    ma.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for load + warm-up")
    ma.set_defaults(func=cmd_models_activate)
    ky = sub.add_parser("keys", help="make CURVE key pairs for engines and their clients (NAME.key, NAME.key_secret)")
    ky.add_argument("names", nargs="+", metavar="NAME", help="one key pair per name (an engine, an IOC)")
    ky.add_argument("--dir", required=True, help="where to write them (the secret file is mode 0600)")
    ky.add_argument("--allow", metavar="DIR", help="also copy each public key into this allowed-clients folder")
    ky.add_argument("--force", action="store_true", help="replace existing key files")
    ky.set_defaults(func=cmd_keys)
    cf = sub.add_parser("config", help="site configuration: check it, show what each service runs, EPICS env")
    cfs = cf.add_subparsers(dest="config_command", required=True)
    cc = cfs.add_parser("check", help="report every problem of a site file, with its line")
    cc.add_argument("file")
    cc.add_argument("--no-models", action="store_true", help="do not look the models up in the store")
    cc.set_defaults(func=cmd_config_check)
    ce = cfs.add_parser("epics-env", help="print the site's EPICS_CA_* settings as an EnvironmentFile")
    ce.add_argument("file")
    ce.set_defaults(func=cmd_config_epics_env)
    cs = cfs.add_parser("show", help="print the effective config of every engine and camera as JSON")
    cs.add_argument("file")
    cs.set_defaults(func=cmd_config_show)
    g = sub.add_parser("engine", help="the ZeroMQ inference service (frames in, denoised frames out)")
    g.add_argument("--config", help="site file (with --name): run that engine's section; flags override it")
    g.add_argument("--name", help="engine name in the site file ([engines.NAME])")
    g.add_argument("--bind", help="data endpoint (default tcp://127.0.0.1:5555); port 0 or * picks a free port")
    g.add_argument("--control", help="control endpoint (default: bind port + 1)")
    g.add_argument("--models", help="model store (default: $CDAE_MODELS or the source tree's models/)")
    g.add_argument("--model", help="NAME[:VERSION] active at start (default: the shipped model)")
    g.add_argument("--backend", choices=BACKEND_KINDS)
    g.add_argument("--max-pixels", type=int, help="frames larger than this are tiled (default 2048*2048)")
    g.add_argument("--tile-margin", type=int, help="tile overlap in pixels (default: the network's receptive radius)")
    g.add_argument("--max-frame-pixels", type=int, help="refuse declared frames larger than this")
    g.add_argument("--queue", type=int, help="frames waiting per client before the oldest is dropped (default 2)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--device", help="CUDA device for torch-cuda/tensorrt (default cuda:0)")
    g.add_argument("--precision", choices=["auto", "fp16", "bf16", "fp32"])
    g.add_argument("--trt-max-side", type=int, help="TensorRT profile's largest side (larger frames are tiled)")
    g.add_argument("--trt-opt-side", type=int, help="TensorRT profile's tuned side")
    g.add_argument("--no-cuda-graphs", action="store_true")
    g.add_argument("--guard", action="store_true", help="hold every output to the camera's noise and flag every pixel "
                   "that moves further, with its class (see docs/design.md)")
    g.add_argument("--guard-k", type=float, help="with --guard: unflagged pixels move at most this many sigma (default 1)")
    g.set_defaults(func=cmd_engine)
    _add_operator_parsers(sub)
    _add_systemd_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cdae.errors import user_errors

    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        _err(f"cdae {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
