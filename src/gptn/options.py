"""Command-line flags generated from the configuration dataclasses (PretrainConfig, FinetuneConfig):
a field's name, type, default, choices and help are written once, on the field, and become its flag
(`--batch-size`), its help text and its place in a `--config FILE.yaml` (the field names as keys).

    batch_size: int = option(32, "examples per optimizer step (GPT-1: 32)")

A value comes from, in order of precedence: the command line, the --config file, the field's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path

from .config import GPTConfig, GptnError, read_json

# What a field's metadata may say: its help, the values it takes, "cli": False to leave it off the
# command line (an argument the command declares itself) or "positional" for an argument without a
# flag, "parse" (the function that reads the flag's text), "metavar", and "nargs" for a flag that takes
# several values at once (a list field's flag otherwise repeats).
OPTION_KEYS = ("help", "choices", "cli", "parse", "metavar", "nargs")


def option(default=dataclasses.MISSING, help: str = "", *, factory=None, **meta):
    """A dataclass field with its command-line help (and choices, cli) as metadata."""
    unknown = set(meta) - set(OPTION_KEYS)
    if unknown:
        raise TypeError(f"option(): unknown metadata {sorted(unknown)}")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def positive(kind: type):
    """A flag's parser for a number > 0 (kind float: finite; kind int: whole): argparse's one-line error otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' * (kind is int)}number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a {'whole number >= 1' if kind is int else 'positive finite number'}, "
                                             f"got {text!r}")
        return value
    return parse


def check_choices(config) -> None:
    """Refuse a field value outside the field's choices (one line naming the field and the choices)."""
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise GptnError(f"{f.name} must be one of {', '.join(map(str, choices))}, not {value!r}")


def _base_type(hint) -> type:
    """int for `int | None`, and so on: the type a flag's value is converted to."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    return next(a for a in typing.get_args(hint) if a is not type(None))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _flagged(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("help")) and f.metadata.get("cli") is None


def add_options(parser: argparse.ArgumentParser, cls, config_file: bool = True) -> None:
    """One argument per field of `cls` that has help: a flag, or a positional argument (cli="positional");
    fields with cli=False, or no help, are left to the command. Flags default to "not given", so that
    a --config file (when `config_file`) can fill what the line leaves; a list field's flag repeats."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("help") or meta.get("cli") is False:
            continue
        kind, default = _base_type(hints[f.name]), _default(f)
        text, listed = meta["help"].replace("%", "%%"), typing.get_origin(kind) is list
        parse = meta.get("parse") or (typing.get_args(kind)[0] if listed else kind)
        if meta.get("cli") == "positional":
            nargs = ("*" if f.default_factory is not dataclasses.MISSING else "+") if listed else \
                "?" if f.default is not dataclasses.MISSING else None
            parser.add_argument(f.name, type=parse, nargs=nargs, help=text, metavar=meta.get("metavar"),
                                **({} if nargs is None or nargs == "+" else {"default": default}))
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:  # a switch: --name sets True, or --no-name sets False when True is the default
            parser.add_argument("--no-" + flag[2:] if default is True else flag, dest=f.name, default=argparse.SUPPRESS,
                                action="store_false" if default is True else "store_true", help=text)
            continue
        if default not in (None, []) and "default" not in text:
            text += f" (default {default:g})" if isinstance(default, float) else f" (default {default})"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        parser.add_argument(flag, dest=f.name, type=parse, choices=meta.get("choices"), default=argparse.SUPPRESS,
                            action="append" if listed and "nargs" not in meta else "store", nargs=meta.get("nargs"),
                            metavar=meta.get("metavar"), help=text, required=required)
    if config_file:
        parser.add_argument("--config", dest="options_file", metavar="FILE.yaml", default=None,
                            help="read options from a YAML (or JSON) file whose keys are these flags' names "
                                 "with underscores (batch_size: 32); flags on the command line win")


def read_options_file(path: str | Path, cls) -> dict:
    """The options a --config file sets, checked against `cls`'s fields (those with a flag); one line
    naming a bad file."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise GptnError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or give a .json file") from None
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise GptnError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise GptnError(f"{path} is not a mapping of option names to values")
    else:
        values = read_json(path)
    names = {f.name for f in dataclasses.fields(cls) if _flagged(f)}
    unknown = sorted(set(values) - names)
    if unknown:
        if set(unknown) <= {f.name for f in dataclasses.fields(GPTConfig)}:  # a model's shape, not run options
            raise GptnError(f"{path} holds model fields ({', '.join(unknown[:3])}): give it as --model-config, or "
                            "each field with --set")
        raise GptnError(f"{path}: unknown option {unknown[0]!r}; options are the flags' names, e.g. "
                        f"{', '.join(sorted(names)[:4])}")
    return values


def from_options(cls, args: argparse.Namespace, **given):
    """An instance of `cls` from the parsed flags, the --config file and `given` (the command's own
    arguments); the dataclass checks every value."""
    values = read_options_file(args.options_file, cls) if getattr(args, "options_file", None) else {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name) and f.metadata.get("help") and f.metadata.get("cli") is not False:
            values[f.name] = getattr(args, f.name)  # flags and positional arguments
    try:
        return cls(**{**values, **given})
    except TypeError as e:  # a value of the wrong type in the file
        raise GptnError(f"{args.options_file}: {e}") from None
