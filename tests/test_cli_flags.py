"""The flags generated from the config models (cdae/cli/_common.py ``config_flags``): the model's type, choices,
description and default, and no import of the model's module until its subcommand is used."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cdae.cli import build_parser


def _sub(parser, name):  # noqa: ANN001, ANN202
    (subs,) = [a for a in parser._actions if a.dest == "command"]
    return subs.choices[name]


def test_unset_flags_leave_the_models_defaults() -> None:
    from cdae.cli.serve import BACKEND_FIELDS, CAMERA_FIELDS, ENGINE_FIELDS, IOC_FIELDS

    for argv, fields in ((["engine"], (*ENGINE_FIELDS, *BACKEND_FIELDS)), (["sim-camera"], CAMERA_FIELDS),
                         (["ioc"], IOC_FIELDS)):
        args = build_parser().parse_args(argv)
        assert {f: getattr(args, f) for f in fields} == dict.fromkeys(fields), argv


def test_flags_take_the_fields_types_and_choices() -> None:
    args = build_parser().parse_args(["engine", "--queue", "4", "--precision", "bf16", "--models", "/m",
                                      "--tile-margin", "3"])
    assert (args.queue, args.precision, args.models_dir, args.tile_margin) == (4, "bf16", "/m", 3)
    args = build_parser().parse_args(["sim-camera", "--rate", "2.5", "--data-type", "Int16", "--pva", "--point-sigma", "1"])
    assert (args.rate_hz, args.data_type, args.pva, args.point_sigma_px) == (2.5, "Int16", True, 1.0)
    for argv in (["engine", "--precision", "fp8"], ["sim-camera", "--data-type", "Int32"], ["engine", "--queue", "x"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_help_is_the_fields_description_and_default() -> None:
    from cdae.engine.config import EngineConfig

    text = " ".join(_sub(build_parser(), "engine").format_help().split())
    queue = EngineConfig.model_fields["queue"]
    assert f"{queue.description} (default {queue.default})" in text


def test_the_top_level_help_imports_no_config_module() -> None:
    code = ("import sys; from cdae.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('caproto', 'scipy', 'cdae.ioc.filter', 'cdae.simcamera', 'cdae.engine.config') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
