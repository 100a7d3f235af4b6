"""The ``cdae`` command line: thin subcommands over the packages' functions.

Heavy imports (torch, the simulator) happen inside each subcommand, so ``cdae --help`` and the
IOC's commands stay light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cdae import __version__


def _models_dir(arg: str | None) -> Path:
    from cdae.engine.config import default_models_dir

    return Path(arg) if arg else default_models_dir()


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


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
        train(member, models, run_dir, resume=args.resume, progress=not args.no_progress)
    return 0


# --- evaluate ----------------------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry, read_manifest, write_manifest
    from cdae.training.config import DataConfig
    from cdae.training.evaluate import evaluate

    registry = ModelRegistry(_models_dir(args.models_dir))
    refs = args.model or [DEFAULT_MODEL]
    pkgs = [registry.resolve(r) for r in refs]
    denoisers = [Denoiser.from_package(p) for p in pkgs]
    names = [d.manifest.ref for d in denoisers]
    td = denoisers[0].manifest.training_config.get("data")
    data = DataConfig.model_validate(td) if isinstance(td, dict) else DataConfig()
    out = Path(args.out) if args.out else pkgs[0] / "evaluation"
    sizes = [tuple(int(v) for v in s.lower().split("x"))[::-1] for s in args.sizes.split(",")]
    report = evaluate(list(zip(names, denoisers)), out, data, frames=args.frames, val_frames=args.val_frames,
                      sizes=sizes, timing=not args.no_timing)
    for name, c in report["comparisons"].items():
        s = report["methods"][name]["summary"]
        print(f"{name}: PSNR {s['psnr_db']:.2f} dB ({c['psnr_gain_over_best_baseline_db']:+.2f} dB vs "
              f"{report['best_baseline']}), defect RMSE {c['defect_rmse_ratio_best_baseline_over_model']:.2f}x better, "
              f"bright RMSE {c['bright_rmse_model_over_noisy']:.3f} of noisy; targets met: {c['meets_targets']}")
    if args.update_manifest:
        for pkg, name in zip(pkgs, names):
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

def cmd_denoise(args: argparse.Namespace) -> int:
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry

    registry = ModelRegistry(_models_dir(args.models_dir))
    denoiser = Denoiser.from_package(registry.resolve(args.model or DEFAULT_MODEL))
    print(f"model {denoiser.manifest.ref}", file=sys.stderr)
    from cdae.training.denoise import denoise_files

    written, errors = denoise_files(args.inputs, args.output, denoiser, args.bit_depth, error=_err)
    print(f"{len(written)} written, {len(errors)} failed", file=sys.stderr)
    return 1 if errors else 0


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
    from cdae.ioc.camera import CameraConfig, run_camera
    from cdae.ioc.runner import run_until_signalled

    fields: dict[str, object] = {"prefix": args.prefix}
    if args.size:
        w, h = (int(v) for v in args.size.lower().split("x"))
        fields.update(width=w, height=h)
    if args.max_size:
        w, h = (int(v) for v in args.max_size.lower().split("x"))
        fields.update(max_width=w, max_height=h)
    for key in ("rate_hz", "data_type", "bit_depth", "seed", "bank"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.stopped:
        fields["acquire"] = False
    try:
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
        raise SystemExit(f"cdae {kind}: error: --name needs --config SITE_FILE")
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
                                               "engine_timeout_s")}
    if args.no_residual:
        overrides["residual"] = False
    if args.no_defect_map:
        overrides["defect_map"] = False
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
    except (ValueError, OSError, IocError, SiteError) as e:
        _err(f"cdae ioc: error: {e}")
        return 2
    return run_until_signalled(lambda stop: run_ioc(config, stop))


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
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="held-out evaluation against tuned median/Gaussian baselines")
    e.add_argument("--model", action="append", help="NAME[:VERSION]; repeat to compare (default: the shipped model)")
    e.add_argument("--models-dir")
    e.add_argument("--frames", type=int, default=48)
    e.add_argument("--val-frames", type=int, default=24)
    e.add_argument("--sizes", default="256x256,320x192", help="WxH list the held-out frames cycle through")
    e.add_argument("--out", help="report folder (default: <package>/evaluation)")
    e.add_argument("--update-manifest", action="store_true", help="record the held-out metrics in the manifest")
    e.add_argument("--no-timing", action="store_true", help="skip the 1024x1024 CPU timing")
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
    d.set_defaults(func=cmd_denoise)

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
    dm.add_argument("--backend", choices=["auto", "tensorrt", "torch-cuda", "torch-cpu", "passthrough"])
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
    sc.set_defaults(func=cmd_sim_camera)
    io = sub.add_parser("ioc", help="the filter IOC: camera PV in, engine, denoised areaDetector-style PVs out")
    io.add_argument("--config", help="TOML file with IocConfig fields, or with --name a site file (flags override it)")
    io.add_argument("--name", help="camera name in the site file ([cameras.NAME])")
    io.add_argument("--source", help="source prefix (e.g. 13SIM1:image1:) or, with --width/--height, a waveform PV")
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
    io.add_argument("--no-residual", action="store_true", help="do not publish Residual:ArrayData")
    io.add_argument("--no-defect-map", action="store_true", help="do not publish DefectMap:ArrayData")
    io.set_defaults(func=cmd_ioc)
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
    g.add_argument("--backend", choices=["auto", "tensorrt", "torch-cuda", "torch-cpu", "passthrough"])
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
    g.set_defaults(func=cmd_engine)
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
