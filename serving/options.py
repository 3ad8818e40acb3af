"""Typed settings from flags and environment variables: the machinery every program shares.

A program's settings are a frozen dataclass whose fields are declared with `option()`: the
default, the help text, the bounds and the choices live there and nowhere else. `parse()`
builds the argparse parser from the fields (flag `--max-batch-size` for `max_batch_size`,
environment variable `CONVSERVE_MAX_BATCH_SIZE` when the program takes them; a flag beats the
variable, the variable beats the default) and validates once, in `__post_init__` (`validate`
plus the class's own cross-field checks), so an object built in code is held to the same
rules as one built from a command line. A field whose type is itself a settings dataclass
contributes its flags (`nested`: the client's access options in cnn-predict and cnn-bench).

It imports nothing of the server, so a client command pays nothing for it. Programs:
cnn-serve (serving.settings), cnn-predict and cnn-bench (serving.client).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "CONVSERVE_"


class SettingsError(ValueError):
    """Settings that cannot work; the message names the flag."""


@dataclass(frozen=True)
class Option:
    """What a settings field declares besides its type and default."""

    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # default: the field name with '-' for '_'
    cli: bool = True  # False: set by code only (not a flag, not a variable)
    env: bool = True  # read ENV_PREFIX + FLAG when the program reads variables
    env_always: bool = False  # read it even where the program reads no others (a secret)
    exclusive: str | None = None  # options naming one group exclude each other as flags
    parse: Callable[[str], Any] | None = None  # text -> value; ValueError says why
    metavar: str | None = None

    def flag_of(self, name: str) -> str:
        return self.flag or name.replace("_", "-")

    def reads_env(self, program_env: bool) -> bool:
        return self.env_always or (program_env and self.env)


def option(default: Any, help: str, **kw: Any) -> Any:
    """A settings field: its default and its `Option`."""
    return field(default=default, metadata={"option": Option(help, **kw)})


def nested(cls: type) -> Any:
    """A settings field holding another settings dataclass, whose flags it contributes."""
    return field(default_factory=cls, metadata={"nested": True})


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def validate(settings: Any) -> None:
    """Bounds and choices of every option field; SettingsError names the flag. A path given
    as a string in code becomes a Path, as it would from the command line."""
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        opt = f.metadata.get("option")
        value = getattr(settings, f.name)
        if opt is None or value is None:
            continue
        if isinstance(value, str) and hints[f.name] in (Path, Path | None):
            value = _path_or_none(value)
            object.__setattr__(settings, f.name, value)  # frozen: once, while validating
            if value is None:
                continue
        flag = f"--{opt.flag_of(f.name)}" if opt.cli else f.name
        if opt.minimum is not None and value < opt.minimum:
            raise SettingsError(f"{flag} must be >= {opt.minimum:g}")
        if opt.choices is not None and value not in opt.choices:
            raise SettingsError(f"{flag} must be one of {', '.join(opt.choices)}; got {value!r}")


# ----------------------------------------------------------------------------- parsing
def _truthy(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off")


def _leaf_fields(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, type) of every option field, nested settings flattened."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            out += [((f.name, *p), g, t) for p, g, t in _leaf_fields(hints[f.name])]
        elif "option" in f.metadata and f.metadata["option"].cli:
            out.append(((f.name,), f, hints[f.name]))
    return out


def _converter(opt: Option, typ: Any) -> Callable[[str], Any] | None:
    if opt.parse is not None:
        return opt.parse
    optional = typing.get_origin(typ) in (typing.Union, _UnionType)
    base = typing.get_args(typ)[0] if optional else typ
    if optional and base is Path:
        return _path_or_none
    return base if base in (int, float, str, Path) else None


def _path_or_none(text: str) -> Path | None:
    """An empty path is no path (a blank variable in a compose file means "off")."""
    return Path(text) if text else None


_UnionType = type(int | None)


def _dest(path: tuple[str, ...]) -> str:
    return "__".join(path)


def build_parser(cls: type, prog: str, description: str, *, env: bool) -> argparse.ArgumentParser:
    """An argparse parser with a flag per option field of `cls` (defaults: see `parse`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    groups: dict[str, Any] = {}
    for path, f, typ in _leaf_fields(cls):
        opt: Option = f.metadata["option"]
        flag = opt.flag_of(f.name)
        help_text = opt.help
        if opt.reads_env(env):
            help_text += f" [{env_name(flag)}]"
        kw: dict[str, Any] = {"dest": _dest(path), "default": None, "help": help_text}
        if opt.metavar or (typ is not bool and opt.choices is None):
            # the flag's name, not the dest's (a nested field's dest is ACCESS__TLS_CA)
            kw["metavar"] = opt.metavar or flag.upper().replace("-", "_")
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) is tuple and opt.parse is None:
            kw["action"] = "append"  # repeatable
        else:
            kw["type"] = _converter(opt, typ)
            if opt.choices is not None:
                kw["choices"] = list(opt.choices)
        if opt.exclusive is not None and opt.exclusive not in groups:
            groups[opt.exclusive] = p.add_mutually_exclusive_group()
        groups.get(opt.exclusive, p).add_argument(f"--{flag}", **kw)
    return p


def parse(
    cls: type,
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    env: bool = True,
    environ: Mapping[str, str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Any, argparse.Namespace]:
    """Settings of type `cls` from `argv` (a flag), then `environ` (a variable, when `env`),
    then the field's default. Errors exit as argparse's do, naming the flag. `extra` adds
    arguments that are not settings (positional paths, an output file); they come back in
    the namespace."""
    environ = os.environ if environ is None else environ
    p = build_parser(cls, prog, description, env=env)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    values: dict[tuple[str, ...], Any] = {}
    for path, f, typ in _leaf_fields(cls):
        opt: Option = f.metadata["option"]
        value = getattr(args, _dest(path))
        text = environ.get(env_name(opt.flag_of(f.name))) if opt.reads_env(env) else None
        if value is None and text is not None:
            value = _from_env(p, opt.flag_of(f.name), opt, typ, text)
        if value is not None:
            values[path] = tuple(value) if isinstance(value, list) else value
    try:
        return _build(cls, values, ()), args
    except SettingsError as exc:
        p.error(str(exc))
    raise AssertionError("unreachable")  # p.error exits


def _from_env(p: argparse.ArgumentParser, flag: str, opt: Option, typ: Any, text: str) -> Any:
    if typ is bool:
        return _truthy(text)
    if typing.get_origin(typ) is tuple and opt.parse is None:
        return tuple(text.split())
    convert = _converter(opt, typ) or str
    try:
        value = convert(text)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        p.error(f"{env_name(flag)}={text!r}: {exc}")
    if opt.choices is not None and value not in opt.choices:
        p.error(f"{env_name(flag)}={text!r}: choose from {', '.join(opt.choices)}")
    return value


def _build(cls: type, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...]) -> Any:
    hints = _hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if f.metadata.get("nested"):
            kw[f.name] = _build(hints[f.name], values, path)
        elif path in values:
            kw[f.name] = values[path]
    return cls(**kw)
