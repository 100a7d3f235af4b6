"""The ``cdae`` command line: thin subcommands over the packages' functions.

Each module here holds the subcommands of one role and adds their parsers (``add_parsers``): ``train`` (making
and judging models), ``camera`` (a real camera's recordings, profile, bad pixels, health), ``serve`` (engine,
filter IOC, simulated camera, demo, denoising files), ``models`` (export, the model store, CURVE keys), ``site``
(site file, systemd units, operator display, archiver list). Heavy imports (torch, the simulator) happen inside
each subcommand, and the flags generated from a config model are added when their subcommand is used, so
``cdae --help`` and the IOC's commands stay light.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cdae import __version__
from cdae.cli import camera, models, serve, site, train
from cdae.cli._common import Parser, _err

__all__ = ["build_parser", "main"]


def build_parser() -> Parser:
    p = Parser(prog="cdae", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"cdae {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for role in (train, camera, serve, models, site):
        role.add_parsers(sub)
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
