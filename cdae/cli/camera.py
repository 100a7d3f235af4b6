"""``cdae record``, ``characterise``, ``badpixels``, ``health``: what a real camera is like, from its frames."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdae.cli._common import _err, _site, _usage_error


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


def cmd_badpixels(args: argparse.Namespace) -> int:
    """Find a camera's bad pixels from dark frames and/or flat fields; write an NDPluginBadPixel file."""
    from cdae.engine.badpixels import BadPixelError, BadPixelMap
    from cdae.training.characterise import find_bad_pixels
    from cdae.training.fileio import FileFormatError, read_stack

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
            darks, flats = read_stack(args.darks), read_stack(args.flats)
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


def cmd_health(args: argparse.Namespace) -> int:
    """A camera-health report (map, counts over time, first-seen list) from a recording or a live IOC."""
    from cdae.health import HealthConfig, HealthError
    from cdae.healthreport import report_from_ioc, report_from_recording, write_report

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
            image, doc, history, summary = report_from_recording(args.recording, config)
        else:
            image, doc, history, summary = report_from_ioc(args.from_ioc, args.archiver, args.hours)
        written = write_report(args.output, image, doc, history, summary)
    except (HealthError, OSError, TimeoutError, ValueError) as e:
        _err(f"cdae health: error: {e}")
        return 2
    print(f"{args.output}: {', '.join(p.name for p in written)} ({len(doc.get('pixels', []))} pixels, "  # type: ignore[arg-type]
          f"{len(doc.get('lines', []))} lines; counts from {summary['history_source']})")  # type: ignore[arg-type]
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
