"""``cdae engine``, ``ioc``, ``sim-camera``, ``demo``, ``compare``, ``denoise``: running a model on frames, live or
on files.

The engine's, the filter IOC's, the simulated camera's and the demo's flags are generated from their config models
(``EngineConfig``/``BackendOptions``, ``IocConfig``, ``CameraConfig``, ``DemoConfig``): each default is the model's.
Flags that mean something else than "set this field" (``--no-residual``, ``--no-guard``, ``--size``) are written here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cdae.cli._common import _err, _models_dir, _site, _wxh, given
from cdae.engine.kinds import BACKEND_KINDS

#: EngineConfig fields with a flag of their own (``--models`` is ``models_dir``), and BackendOptions fields.
ENGINE_FIELDS = ("bind", "control", "models_dir", "model", "max_pixels", "tile_margin", "max_frame_pixels", "queue",
                 "threads")
BACKEND_FIELDS = ("device", "precision", "cpu_kernels", "trt_max_side", "trt_opt_side")
#: IocConfig fields with a flag of their own.
IOC_FIELDS = ("source", "prefix", "engine", "control", "model", "width", "height", "data_type", "bit_depth",
              "queue_size", "max_elements", "engine_timeout_s", "bad_pixel_file", "pva")
#: CameraConfig fields with a flag of their own.
CAMERA_FIELDS = ("prefix", "rate_hz", "data_type", "bit_depth", "seed", "bank", "read_noise_e", "hot_column_offset_frac",
                 "static_scene", "fresh_noise", "point_sigma_px", "pva")
#: DemoConfig fields with a flag of their own (``--backend`` is written out: every --backend takes BACKEND_KINDS).
DEMO_FIELDS = ("output", "model", "models_dir", "size", "rate", "data_type", "bit_depth", "prefix", "seconds")


def cmd_engine(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cdae.deploy.site import SiteError
    from cdae.engine.config import EngineConfig
    from cdae.engine.errors import EngineError
    from cdae.engine.server import run_engine

    fields = given(args, ("backend", *ENGINE_FIELDS))
    options = given(args, BACKEND_FIELDS)
    if args.no_cuda_graphs:
        options["cuda_graphs"] = False
    if args.no_device_pre_post:
        options["device_pre_post"] = False
    if args.guard_graphs:
        options["guard_graphs"] = True
    if args.device_statistics:
        options["host_statistics"] = False
    problem, guard = _guard_flags(args, "engine")
    if problem:
        _err(problem)
        return 2
    if args.no_guard or args.guard_k is not None:  # otherwise the site file's guard, or the default
        fields["guard"] = guard
    try:
        site = _site(args, "engine")
        base = site.engine_config(args.name).model_dump(exclude_unset=True) if site else {}
        base.update(fields)
        base["backend_options"] = {**dict(base.get("backend_options") or {}), **options}
        config = EngineConfig.model_validate(base)
    except (ValueError, SiteError) as e:  # pydantic's ValidationError: say which flag is wrong, no traceback
        _err(f"cdae engine: error: {e}")
        return 2
    from cdae.lines import log
    from cdae.memory import retain_frame_memory

    log("cdae-engine", retain_frame_memory())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        status = run_engine(config, stop)
    except EngineError as e:
        _err(f"cdae engine: error: {e}")
        return 2
    _exit_stopped(status)
    return status  # not reached


def _exit_stopped(status: int) -> None:
    """Exit a stopped engine at once: it has closed its sockets, released its backends and said so, and what the
    interpreter would still do is free torch's modules one by one (0.5 s of CPU that a restart waits for)."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say to it
            pass
    os._exit(status)


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

    overrides = given(args, IOC_FIELDS)
    if args.no_residual:
        overrides["residual"] = False
    if args.no_defect_map:
        overrides["defect_map"] = False
    try:
        site = _site(args, "ioc")
        if site is not None:
            _apply_epics_env(site)
            base = site.ioc_config(args.name).model_dump(exclude_unset=True)
            base.update(overrides)
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
    from cdae.lines import log
    from cdae.memory import retain_frame_memory

    log("cdae-ioc", retain_frame_memory())
    return run_until_signalled(lambda stop: run_ioc(config, stop))


def cmd_sim_camera(args: argparse.Namespace) -> int:
    from cdae.ioc.runner import run_until_signalled
    from cdae.simcamera import CameraConfig, DamageEvent, run_camera

    fields = given(args, CAMERA_FIELDS)
    if args.size:
        fields["width"], fields["height"] = _wxh(args.size)
    if args.max_size:
        fields["max_width"], fields["max_height"] = _wxh(args.max_size)
    if args.stopped:
        fields["acquire"] = False
    if args.shutter_closed:
        fields["shutter_open"] = False
    if args.pva:
        from cdae.ioc.pva import p4p_missing

        missing = p4p_missing()
        if missing:
            _err(f"cdae sim-camera: error: --pva: {missing}")
            return 2
    if args.hot_columns:
        fields["hot_columns"] = [int(x) for x in args.hot_columns.split(",")]
    try:
        if args.damage:
            fields["damage"] = [DamageEvent.parse(spec) for spec in args.damage]
        if args.point_source:
            fields["point_sources"] = [tuple(float(v) for v in spec.split(",")) for spec in args.point_source]
        config = CameraConfig.model_validate(fields)
    except ValueError as e:
        _err(f"cdae sim-camera: error: {e}")
        return 2
    return run_until_signalled(lambda stop: run_camera(config, stop))


def cmd_demo(args: argparse.Namespace) -> int:
    from cdae.demo import DemoConfig, run_live_demo

    try:
        config = DemoConfig.model_validate(given(args, ("backend", *DEMO_FIELDS)))
    except ValueError as e:
        _err(f"cdae demo: error: {e}")
        return 2
    return run_live_demo(config)


def cmd_compare(args: argparse.Namespace) -> int:
    from cdae.demo import run_compare

    w, h = _wxh(args.size)
    run_compare(args.output, args.model, Path(args.models_dir) if args.models_dir else None, args.frames, (h, w))
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    from cdae.engine.badpixels import BadPixelError, BadPixelMap
    from cdae.engine.guard import GuardConfig
    from cdae.engine.inference import Denoiser
    from cdae.engine.package import DEFAULT_MODEL, ModelRegistry

    bad_pixels = None
    if args.bad_pixels:
        try:
            bad_pixels = BadPixelMap.load(args.bad_pixels)
        except BadPixelError as e:
            _err(f"cdae denoise: error: {e}")
            return 2
    problem, fields = _guard_flags(args, "denoise", ("--defect-map", args.defect_map))
    if problem:
        _err(problem)
        return 2
    guard = None if fields is None else GuardConfig(**fields)
    from cdae.training.denoise import denoise_files, make_output_folder
    from cdae.training.fileio import FileFormatError

    try:  # before the model loads: a folder that cannot be made is the command line's error
        make_output_folder(args.output)
    except FileFormatError as e:
        _err(f"cdae denoise: error: {e}")
        return 2
    registry = ModelRegistry(_models_dir(args.models_dir))
    denoiser = Denoiser.from_package(registry.resolve(args.model or DEFAULT_MODEL), guard=guard)
    print(f"model {denoiser.manifest.ref}" + (f", {len(bad_pixels)} listed bad pixels" if bad_pixels else ""),
          file=sys.stderr)
    written, errors = denoise_files(args.inputs, args.output, denoiser, args.bit_depth, error=_err,
                                    bad_pixels=bad_pixels, defect_map=args.defect_map)
    print(f"{len(written)} written, {len(errors)} failed", file=sys.stderr)
    return 1 if errors else 0


def _add_guard_flags(p: argparse.ArgumentParser, verb: str) -> None:
    """The noise guard's flags, the same for the engine and `cdae denoise` (see :func:`_guard_flags`)."""
    p.add_argument("--no-guard", action="store_true", help=f"{verb} the network's output unbounded (default: every "
                   "output pixel held to the camera's noise, what moves further flagged with its class; docs/design.md)")
    p.add_argument("--guard", action="store_true", help="the default (kept for older command lines)")
    p.add_argument("--guard-k", type=float, help="unflagged pixels move at most this many sigma of the noise (default 1)")


def _guard_flags(args: argparse.Namespace, command: str,
                 *needing: tuple[str, bool]) -> tuple[str | None, dict[str, float] | None]:
    """(problem, guard fields): None fields for ``--no-guard``, else the default guard with ``--guard-k``; a
    problem when ``--no-guard`` comes with a flag that needs the guard (``needing``: (flag, given) pairs)."""
    given_flags = [f for f, on in (("--guard", args.guard), ("--guard-k", args.guard_k is not None), *needing) if on]
    if args.no_guard and given_flags:
        verb = "needs" if len(given_flags) == 1 else "need"
        return f"cdae {command}: error: {', '.join(given_flags)} {verb} the guard: drop --no-guard", None
    return None, (None if args.no_guard else {} if args.guard_k is None else {"k_sigma": args.guard_k})


def add_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("engine", help="the ZeroMQ inference service (frames in, denoised frames out)")
    g.add_argument("--config", help="site file (with --name): run that engine's section; flags override it")
    g.add_argument("--name", help="engine name in the site file ([engines.NAME])")
    g.add_argument("--backend", choices=BACKEND_KINDS)
    g.add_argument("--no-cuda-graphs", action="store_true")
    g.add_argument("--no-device-pre-post", action="store_true", help="torch-cuda: normalise, guard and convert "
                   "frames on the host in NumPy, not on the GPU (backend_options.device_pre_post = false)")
    g.add_argument("--device-statistics", action="store_true", help="torch-cuda on the device path: read the frame's "
                   "offset, scale, full well and noise model on the GPU, not the host (backend_options.host_statistics "
                   "= false)")
    g.add_argument("--guard-graphs", action="store_true", help="torch-cuda on the device path: replay the guard as "
                   "one CUDA graph per frame shape (backend_options.guard_graphs = true)")
    _add_guard_flags(g, "serve")
    g.model_flags("cdae.engine.config:EngineConfig", ENGINE_FIELDS, flags={"models_dir": "--models"})
    g.model_flags("cdae.engine.config:BackendOptions", BACKEND_FIELDS)
    g.set_defaults(func=cmd_engine)

    io = sub.add_parser("ioc", help="the filter IOC: camera PV in, engine, denoised areaDetector-style PVs out")
    io.add_argument("--config", help="TOML file with IocConfig fields, or with --name a site file (flags override it)")
    io.add_argument("--name", help="camera name in the site file ([cameras.NAME])")
    io.add_argument("--no-residual", action="store_true", help="do not publish Residual:ArrayData")
    io.add_argument("--no-defect-map", action="store_true", help="do not publish DefectMap:ArrayData")
    io.model_flags("cdae.ioc.config:IocConfig", IOC_FIELDS)
    io.set_defaults(func=cmd_ioc)

    sc = sub.add_parser("sim-camera", help="an areaDetector-like CA IOC serving simulated damaged camera frames")
    sc.add_argument("--size", help="WxH (default 512x512)")
    sc.add_argument("--max-size", help="largest WxH SizeX/SizeY may be set to (default: --size)")
    sc.add_argument("--stopped", action="store_true", help="start with Acquire = Done")
    sc.add_argument("--shutter-closed", action="store_true", help="start with the shutter closed (dark frames)")
    sc.add_argument("--hot-columns", help="comma-separated x of extra hot columns (damage the camera got)")
    sc.add_argument("--damage", action="append", metavar="KIND@FRAME[,key=value]",
                    help="run-time damage, e.g. hot_pixels@200,count=4  hot_column@300,x=30  dead_pixels@50  "
                    "stuck_pixels@50  radiation@100,frames=60,level=5000 (hits/Mpx/frame); repeatable")
    sc.add_argument("--point-source", action="append", metavar="X,Y,PEAK",
                    help="a static point source (peak in relative intensity, 1 = full well), blurred by the "
                    "camera's optics (--point-sigma); repeatable")
    sc.model_flags("cdae.simcamera:CameraConfig", CAMERA_FIELDS,
                   flags={"rate_hz": "--rate", "point_sigma_px": "--point-sigma"}, bit_depth={"choices": [12, 16]})
    sc.set_defaults(func=cmd_sim_camera)

    dm = sub.add_parser("demo", help="live: simulated camera → engine → filter IOC on loopback, with status and snapshot")
    dm.add_argument("--backend", choices=BACKEND_KINDS)
    dm.model_flags("cdae.demo:DemoConfig", DEMO_FIELDS, flags={"output": ("-o", "--output")})
    dm.set_defaults(func=cmd_demo)

    m = sub.add_parser("compare", help="offline: the model on simulated damaged frames, beside median/Gaussian filters")
    m.add_argument("-o", "--output", default="demo-out", help="folder for demo.png")
    m.add_argument("--model", help="NAME[:VERSION] (default: the shipped model)")
    m.add_argument("--models-dir")
    m.add_argument("--frames", type=int, default=6)
    m.add_argument("--size", default="512x512", help="WxH")
    m.set_defaults(func=cmd_compare)

    d = sub.add_parser("denoise", help="denoise .npy/.tif/.png/HDF5 (file.h5:/dataset) files")
    d.add_argument("inputs", nargs="+")
    d.add_argument("-o", "--output", required=True, help="output folder (file names are kept)")
    d.add_argument("--model", help="NAME[:VERSION] (default: the shipped model)")
    d.add_argument("--models-dir")
    d.add_argument("--bit-depth", type=int, help="camera bit depth when the container is wider (e.g. 12 in uint16)")
    d.add_argument("--bad-pixels", help="the camera's bad-pixel file (areaDetector NDPluginBadPixel JSON, e.g. from "
                   "cdae badpixels): listed pixels are filled in the denoised frames")
    _add_guard_flags(d, "write")
    d.add_argument("--defect-map", action="store_true", help="write NAME.flags.tif (flag class per pixel) and "
                   "NAME.flags.png beside each output")
    d.set_defaults(func=cmd_denoise)
