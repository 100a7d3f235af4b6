"""What every subcommand module of the ``cdae`` command shares: error reports, the model store, the site file,
and flags generated from the pydantic config models (so a field's type, help and default are written once)."""

from __future__ import annotations

import argparse
import importlib
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

if typing.TYPE_CHECKING:
    from pydantic import BaseModel


def _models_dir(arg: str | None) -> Path:
    from cdae.engine.config import default_models_dir

    return Path(arg) if arg else default_models_dir()


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _usage_error(msg: str) -> NoReturn:
    """A wrong combination of flags: one line, exit status 2 (as argparse does)."""
    _err(msg)
    raise SystemExit(2)


def _site(args: argparse.Namespace, kind: str):  # -> SiteConfig | None
    """The site file when ``--name`` is given (``--config`` is then a site file), else None."""
    if args.name is None:
        return None
    if args.config is None:
        _usage_error(f"cdae {kind}: error: --name needs --config SITE_FILE")
    from cdae.deploy.site import load_site

    return load_site(args.config)


def _wxh(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def print_summaries(summary: Mapping[str, Mapping[str, float]]) -> None:
    """``name: key value, ...`` a line for each method of a report's summary."""
    for name, s in summary.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()))


class Parser(argparse.ArgumentParser):
    """argparse, with flags that may be added when the parser is first used (:meth:`defer`): a subcommand's
    flags generated from a config model whose module is heavy to import (caproto, scipy) then cost the other
    subcommands and ``cdae --help`` nothing. Subparsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._deferred.append(add)

    def model_flags(self, model: str, fields: Iterable[str], flags: Mapping[str, str | tuple[str, ...]] | None = None,
                    **extra: Mapping[str, Any]) -> None:
        """:func:`config_flags` of ``model`` (``"module:Class"``), deferred: the module is imported when this
        parser is used."""
        def add(parser: argparse.ArgumentParser) -> None:
            module, _, name = model.partition(":")
            config_flags(parser, getattr(importlib.import_module(module), name), fields, flags, **extra)

        self.defer(add)

    def _complete(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _flag_type(annotation: object) -> dict[str, Any]:
    """argparse's ``type``/``choices`` for a field's annotation: int and float convert, a Literal gives the
    choices, anything else (str, Path, an enum, a list) is passed as text for pydantic to validate."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _flag_type(rest[0])
        return {}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(args), **({"type": type(args[0])} if type(args[0]) in (int, float) else {})}
    if annotation in (int, float):
        return {"type": annotation}
    return {}


def config_flags(parser: argparse.ArgumentParser, model: type[BaseModel], fields: Iterable[str],
                 flags: Mapping[str, str | tuple[str, ...]] | None = None, **extra: Mapping[str, Any]) -> None:
    """A flag for each of ``fields`` of ``model``: ``--field-name`` (or ``flags[field]``, one option string or
    several), dest the field's name, its type (or a Literal's choices), its description (and default) as help,
    and default None so that an unset flag leaves the model's own default, or the site file's value, in force.
    A bool field that defaults to False is a switch (``--pva`` sets True); ``extra[field]`` adds or replaces
    argparse keywords (``choices``, ``help``)."""
    from pydantic_core import PydanticUndefined

    for name in fields:
        info = model.model_fields[name]
        kwargs: dict[str, Any] = _flag_type(info.annotation)
        if info.annotation is bool:
            assert info.default is False, f"{model.__name__}.{name}: a True default needs an explicit --no- flag"
            kwargs = {"action": "store_const", "const": True}
        help_ = (info.description or "").replace("%", "%%")
        if info.default is not PydanticUndefined and info.default is not None and info.annotation is not bool:
            help_ += f" (default {info.default})"
        kwargs.update({"help": help_.strip() or None, **extra.get(name, {})})
        names = (flags or {}).get(name, "--" + name.replace("_", "-"))
        names = (names,) if isinstance(names, str) else names
        if "action" not in kwargs and "choices" not in kwargs:  # named after the flag, as argparse names its own
            kwargs.setdefault("metavar", names[-1].lstrip("-").replace("-", "_").upper())
        parser.add_argument(*names, dest=name, default=None, **kwargs)


def given(args: argparse.Namespace, fields: Iterable[str]) -> dict[str, object]:
    """The flags of ``fields`` given on the command line (those not None), by field name."""
    return {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
