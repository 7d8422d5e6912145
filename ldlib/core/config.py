"""Configuration dataclasses as command-line flags and notebook parameters: each setting is declared once.

A setting lives in one dataclass field (its default, and its help text in ``field(metadata={"help": ...})``).
``add_config_arguments`` turns every field into a ``--flag`` (nested dataclasses such as ``TrainConfig.loss`` are
flattened; ``snake_case`` becomes ``--kebab-case``); ``config_from_args`` builds the dataclass from what the command
line gave, over the dataclass's own defaults. Notebooks read their parameters with ``env(NAME, default)``: the
environment variable ``LDLIB_<NAME>`` overrides the default, converted to the default's type.

Why not ``transformers.HfArgumentParser``: it cannot express a nested dataclass field (``TrainConfig.loss``) or a
fixed-length tuple (``betas``), and it rewrites the dataclass's field types in place; the few lines here do
exactly what ldlib's configs need.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from typing import Any, Literal


NOT_GIVEN = None  # what an absent flag parses to: the dataclass default then applies


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None was allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def finite(value: float, what: str) -> float:
    """value as a float when it is a finite number; else ValueError naming what (a flag, variable or field)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what}: {value!r} is not a finite number")
    return number


def check_finite(cfg) -> None:
    """ValueError naming the first float field (or float in a tuple field) of a config dataclass that is NaN or inf.

    Every config calls it first in ``__post_init__``: a comparison such as ``lr > 0`` is true for inf and false
    for nothing that NaN would fail, so range checks alone let non-finite values through.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, float):
                finite(item, f"{type(cfg).__name__}.{f.name}")


def check_sigmas(sigmas, what: str) -> None:
    """ValueError naming what unless sigmas is a non-empty list of finite numbers in [0, 1] (1: pure noise)."""
    if not sigmas:
        raise ValueError(f"{what}: give at least one sigma")
    for s in sigmas:
        if not 0 <= finite(s, what) <= 1:
            raise ValueError(f"{what}: sigma {s} is outside [0, 1] (0: clean, 1: pure noise)")


def flag_names(message: str) -> str:
    """A config's error message with each ``Class.field`` it names written as the command-line flag ``--field``."""
    return re.sub(r"\b[A-Z]\w*(?:Config|Spec)\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_fields(cls) -> list[tuple[str, Any, Any, str, tuple | None]]:
    """(name, type, default, help, choices) of every leaf field, nested dataclasses flattened in declaration order.

    ``choices``: the field's ``metadata["choices"]`` (the values its flag accepts, e.g. the preset registry's
    names), or None.
    """
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_fields(tp)
        else:
            choices = f.metadata.get("choices")
            out.append((f.name, tp, _default(f), f.metadata.get("help", ""),
                        tuple(choices) if choices is not None else None))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                         title: str | None = None, preset_sized: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per (flattened) field of a config dataclass; an absent flag leaves the default in place.

    ``preset_sized``: fields whose default comes from --preset, not the dataclass: help says so (not a number
    that is true for one preset only). A field with ``metadata["choices"]`` accepts only those values (argparse
    refuses another and names the choices).
    """
    target = parser.add_argument_group(title) if title else parser
    seen: set[str] = set()
    for name, tp, default, help_text, choices in config_fields(cls):
        if name in skip:
            continue
        if name in seen:
            raise ValueError(f"{cls.__name__}: two fields named {name!r} after flattening nested configs")
        seen.add(name)
        base, _ = _base_type(tp)
        shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
        if name in preset_sized:
            shown = "the preset's"
        kwargs: dict[str, Any] = {"dest": name, "default": NOT_GIVEN,
                                  "help": f"{help_text} (default: {shown})".strip() if help_text else f"default: {shown}"}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs.update(choices=typing.get_args(base), type=type(typing.get_args(base)[0]))
        elif typing.get_origin(base) is tuple:
            kwargs.update(type=comma_tuple(typing.get_args(base), f"--{name.replace('_', '-')}"), metavar="A,B,...")
        elif base is float:
            kwargs["type"] = finite_float(f"--{name.replace('_', '-')}")
        elif base in (int, str):
            kwargs["type"] = base
        else:
            raise TypeError(f"{cls.__name__}.{name}: no command-line form for type {tp}")
        if choices is not None:
            if base not in (int, str):
                raise TypeError(f"{cls.__name__}.{name}: metadata choices need an int or str field, not {tp}")
            # The metavar keeps the usage line short; the help names the values, argparse's error names them too.
            kwargs.update(choices=choices, metavar=name.upper())
        target.add_argument("--" + name.replace("_", "-"), **kwargs)


def finite_float(flag: str):
    """An argparse type: a finite float (NaN and inf refused at parse time, naming the flag)."""

    def parse(text: str) -> float:
        try:
            return finite(text, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def comma_tuple(items: tuple, flag: str):
    """An argparse type: comma-separated values of the tuple's item type (and its length, unless ``...``)."""
    kind = items[0]

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(t) for t in text.split(",") if t.strip())
            if kind is float:
                values = tuple(finite(v, flag) for v in values)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a comma-separated list of finite "
                                             f"{kind.__name__} values")
        if Ellipsis not in items and len(values) != len(items):
            raise argparse.ArgumentTypeError(f"{flag}: expected {len(items)} comma-separated values, got {text!r}")
        return values

    return parse


def config_from_args(cls, args: argparse.Namespace, **fixed):
    """The config dataclass with every flag the command line gave over its defaults; ``fixed`` sets fields directly."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = config_from_args(hints[f.name], args)
        elif getattr(args, f.name, NOT_GIVEN) is not NOT_GIVEN:
            kwargs[f.name] = getattr(args, f.name)
    try:
        return cls(**kwargs)
    except ValueError as e:  # the user typed a flag: name it, not the dataclass field
        raise ValueError(flag_names(str(e))) from e


def _env_value(var: str, text: str, kind: type, negative_ok: bool) -> Any:
    """One value of an environment variable as kind: a finite number (not negative unless allowed) or the text."""
    if kind is str:
        return text
    try:
        value = kind(text.strip())
    except ValueError:
        raise ValueError(f"{var}={text!r}: expected a {kind.__name__}") from None
    if kind is float:
        finite(value, var)
    if not negative_ok and value < 0:
        raise ValueError(f"{var}={text!r}: must be >= 0")
    return value


def env(name: str, default: Any) -> Any:
    """A notebook parameter: ``$LDLIB_<NAME>`` when set (converted to the default's type), else the default.

    Booleans accept 1/0, true/false, yes/no; tuples take comma-separated values; a default of None takes the text.
    Numbers must be finite, and not negative where the default is not (counts, seeds, shares, weights, sigmas); a
    text parameter with a default may not be set empty. Every error names the variable the user set.
    """
    var = f"$LDLIB_{name}"
    text = os.environ.get(f"LDLIB_{name}")
    if text is None:
        return default
    if isinstance(default, bool):
        low = text.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{var}={text!r}: expected 1/0, true/false or yes/no")
        return low in ("1", "true", "yes")
    if isinstance(default, tuple):
        kind = type(default[0]) if default else str
        negative_ok = any(isinstance(d, (int, float)) and d < 0 for d in default)
        values = tuple(_env_value(var, t, kind, negative_ok) for t in text.split(",") if t.strip())
        if not values and default:
            raise ValueError(f"{var}={text!r}: expected comma-separated values, like {','.join(map(str, default))}")
        return values
    if default is None:
        return text or None
    if isinstance(default, str):
        if not text.strip():
            raise ValueError(f"{var} is set but empty: unset it for the default {default!r}, or give a value")
        return text
    return _env_value(var, text, type(default), negative_ok=default < 0)
