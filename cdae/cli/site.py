"""``cdae config check/epics-env/show``, ``systemd units/install``, ``display``, ``archiver-pvs``: a site's
configuration and what it installs beside the services.

The systemd units', the display's and the archiver list's flags are generated from their models (``UnitSettings``,
``DisplaySpec``, ``ArchiverSpec``): each default is the model's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cdae.cli._common import _err, _usage_error, _wxh, given

#: UnitSettings fields with a flag of their own (both ``systemd`` subcommands).
UNIT_FIELDS = ("venv", "config", "user", "epics_env", "models_dir")
#: DisplaySpec and ArchiverSpec fields with a flag of their own.
DISPLAY_FIELDS = ("prefix", "source", "source_is_waveform", "title", "residual_limit")
ARCHIVER_FIELDS = ("prefix", "source", "source_is_waveform", "frame_rate_hz", "images", "image_period_s", "policy")


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

    print(json.dumps(load_site(args.file).effective(), indent=2))
    return 0


def cmd_systemd(args: argparse.Namespace) -> int:
    from pathlib import PurePosixPath

    import cdae.deploy
    from cdae.deploy.systemd import InstallError, UnitSettings, camera_engines, install, render_units, write_units

    try:
        settings = UnitSettings.model_validate(given(args, UNIT_FIELDS))
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
            "source_array": cam.array_suffix, "source_is_waveform": bool(args.source_is_waveform) or cam.plain_waveform}


def cmd_display(args: argparse.Namespace) -> int:
    from cdae.deploy.display import DisplaySpec, write_display

    fields = given(args, DISPLAY_FIELDS)
    fields.update(_camera_fields(args, "display"))
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

    fields = given(args, ARCHIVER_FIELDS)
    fields.update(_camera_fields(args, "archiver-pvs"))
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


def _site_camera_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="site file: take the camera's prefixes from it (with --name)")
    parser.add_argument("--name", help="camera name in the site file")


def add_parsers(sub: argparse._SubParsersAction) -> None:
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

    sd = sub.add_parser("systemd", help="systemd units for the engines and filter IOCs; install them")
    sds = sd.add_subparsers(dest="systemd_command", required=True)
    su = sds.add_parser("units", help="write cdae.target, cdae-engine@.service, cdae-ioc@.service")
    su.add_argument("-o", "--output", required=True, help="folder for the unit files")
    su.add_argument("--site-file", help="read cameras and engines from this site file: per-camera ordering drop-ins")
    su.set_defaults(func=cmd_systemd)
    si = sds.add_parser("install", help="create the user, put site file, EPICS env file, model store and units in place")
    si.add_argument("--destdir", help="stage everything below this folder; no useradd, no systemctl")
    si.add_argument("--unit-dir", default="/etc/systemd/system")
    si.add_argument("--example", help="site file installed when there is none (default deploy/site.example.toml)")
    si.add_argument("--models-from", help="seed an empty model store from this folder (install.sh: the shipped models/)")
    si.add_argument("--no-enable", action="store_true", help="do not enable the target and instances")
    for units in (su, si):
        units.model_flags("cdae.deploy.systemd:UnitSettings", UNIT_FIELDS,
                          models_dir={"help": "model store, read-only for the services (default: the site's)"})
    si.set_defaults(func=cmd_systemd)

    dp = sub.add_parser("display", help="write the operator's Phoebus display (.bob) of one filter IOC")
    _site_camera_flags(dp)
    dp.add_argument("-o", "--output", required=True, help="the .bob file to write")
    dp.add_argument("--image-size", help="on-screen WxH of each image (default 400x400)")
    dp.model_flags("cdae.deploy.display:DisplaySpec", DISPLAY_FIELDS)
    dp.set_defaults(func=cmd_display)

    ap = sub.add_parser("archiver-pvs", help="the Archiver Appliance's archivePV JSON for one filter IOC")
    _site_camera_flags(ap)
    ap.add_argument("-o", "--output", help="JSON file to write (default: stdout)")
    ap.add_argument("--image-size", help="WxH of the frames, for the storage estimate")
    ap.model_flags("cdae.deploy.archiver:ArchiverSpec", ARCHIVER_FIELDS, flags={"frame_rate_hz": "--rate"})
    ap.set_defaults(func=cmd_archiver_pvs)
