"""``--model.<field>=value`` / ``--set model.<field>=value``: typed overrides of config dataclass fields.

A value is read as JSON when it parses (``0.5``, ``true``, ``null``, ``[1, 2]``, ``{"z_loss": 0.0}``),
as a plain string otherwise, then checked against the field's type annotation: ``int``, ``float``,
``bool`` (``true/false/yes/no/1/0``), ``str``, ``X | None`` (``none`` or ``null``), tuples and
mappings (passed to the dataclass, which checks them itself).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def field_types(cls) -> dict[str, typing.Any]:
    """``{field name: resolved type annotation}`` of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _raw(text: str):
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def coerce(text: str, annotation, *, name: str):
    """``text`` as a value of type ``annotation``; ValueError naming ``name`` when it is not one."""
    value = _raw(text) if isinstance(text, str) else text
    return _coerce(value, text, annotation, name)


def _coerce(value, text, annotation, name):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, text, option, name)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name}: expected {_describe(annotation)}, got {text!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if value is not None:
            return text if isinstance(text, str) and not isinstance(value, str) else value
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if isinstance(value, dict):  # e.g. aux_loss_weights given as {name: weight}: the dataclass normalises it
            return value
        if isinstance(value, str):  # a comma-separated list of strings
            return tuple(part for part in value.split(",") if part)
    elif origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
    else:  # a type this parser does not know: the dataclass checks the JSON value itself
        return value
    raise ValueError(f"{name}: expected {_describe(annotation)}, got {text!r}")


def _describe(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def parse_assignment(text: str) -> tuple[str, str]:
    """``"model.ffn_sparsity=0.5"`` -> ``("model.ffn_sparsity", "0.5")`` (ValueError without ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set: expected key=value (e.g. model.ffn_sparsity=0.5), got {text!r}")
    return key.strip(), value


def apply_overrides(config, overrides: list[tuple[str, str]], *, flag_prefix: str = "--model."):
    """``dataclasses.replace(config, ...)`` with each ``(field, text)`` coerced to the field's type.

    Raises:
      ValueError: an unknown field (listing the known ones), a value of the wrong type, or the
        dataclass's own check (each message naming the flag, e.g. ``--model.ffn_sparsity``).
    """
    types_by_name = field_types(type(config))
    values = {}
    for name, text in overrides:
        field = name.replace("-", "_")
        flag = f"{flag_prefix}{name}"
        if field not in types_by_name:
            raise ValueError(f"{flag}: {type(config).__name__} has no field {name!r}; fields: {sorted(types_by_name)}")
        values[field] = coerce(text, types_by_name[field], name=flag)
    if not values:
        return config
    try:
        return dataclasses.replace(config, **values)
    except (TypeError, ValueError) as error:
        flags = ", ".join(f"{flag_prefix}{name}" for name in values)
        raise ValueError(f"{flags}: {error}") from None
