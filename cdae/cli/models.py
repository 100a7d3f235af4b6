"""``cdae export``, ``models list/show/verify/activate``, ``keys``: the model store, its artefacts, and the keys
engines and their clients authenticate with."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdae.cli._common import _err, _models_dir, _usage_error


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

        section = load_site(args.site).triton_section(args.name)
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
    from cdae.deploy.models import describe
    from cdae.engine.package import ModelRegistry, read_manifest

    pkg = ModelRegistry(_models_dir(args.models_dir)).resolve(args.model)
    print(read_manifest(pkg).model_dump_json(indent=2) if args.json else describe(pkg))
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
    from cdae.engine.errors import EngineError

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
    curve = None
    if args.secret_key or args.server_key:
        if not (args.secret_key and args.server_key):
            _err("cdae models activate: error: CURVE needs both --secret-key and --server-key")
            return 2
        from cdae.engine.config import CurveClientKeys

        curve = CurveClientKeys(secret_key_file=args.secret_key, server_public_key_file=args.server_key)
    try:
        with ControlClient(endpoint, timeout_s=args.timeout, curve=curve) as ctl:
            reply = ctl.activate(args.model, wait=True, timeout_s=args.timeout)
    except EngineError as e:  # no reply (an engine that requires CURVE ignores a client without its key), bad key file
        _err(f"cdae models activate: {endpoint}: {e}")
        return 1
    if not reply.ok:
        _err(f"cdae models activate: {args.model} refused: {reply.error} (the engine keeps its current model)")
        return 1
    print(f"{endpoint}: now serving {reply.result.get('model', args.model)}")
    return 0


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


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    ma.add_argument("--secret-key", help="an engine that requires CURVE: this client's NAME.key_secret (`cdae keys`; "
                    "its public key in the engine's allowed_clients_dir)")
    ma.add_argument("--server-key", help="with --secret-key: the engine's public NAME.key")
    ma.set_defaults(func=cmd_models_activate)

    ky = sub.add_parser("keys", help="make CURVE key pairs for engines and their clients (NAME.key, NAME.key_secret)")
    ky.add_argument("names", nargs="+", metavar="NAME", help="one key pair per name (an engine, an IOC)")
    ky.add_argument("--dir", required=True, help="where to write them (the secret file is mode 0600)")
    ky.add_argument("--allow", metavar="DIR", help="also copy each public key into this allowed-clients folder")
    ky.add_argument("--force", action="store_true", help="replace existing key files")
    ky.set_defaults(func=cmd_keys)
