"""Dataclass configs that load from YAML with command-line overrides.

    config = load_config(TrainConfig, "configs/sd15-snpo.yaml", ["--beta", "5000"])

Unknown keys are errors with a suggestion for a likely typo; values are converted to the
field's type with a one-line error naming the field; ``validate()`` (when the dataclass
defines it) runs before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from snpo.errors import ConfigError, UserError

T = TypeVar("T")


def is_alias(f: dataclasses.Field) -> bool:
    """A field kept so older configs load (``metadata={"alias_of": "<field>"}``)."""
    return "alias_of" in f.metadata


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key_error(key: str, known: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _convert(name: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(name, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{name}: cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{name}: expected one of {allowed}, got {value!r}")
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_convert(name, v, item_type) for v in value]
        return tuple(items) if (origin is tuple or annotation is tuple) else items
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if annotation is Path:
        return Path(value)
    return value


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """``["--beta", "5000", "--objective=dpo"]`` -> ``{"beta": "5000", "objective": "dpo"}``.

    A flag with no value (``--gradient_checkpointing``) means true. Dashes in names may be
    written as underscores or hyphens.
    """
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 1
        else:
            value = "true"
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def config_from_dict(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Build and validate ``cls`` from a mapping; unknown keys and bad values are errors."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key_error(key, list(types_), where)
        kwargs[key] = _convert(key, value, types_[key])
    try:
        config = cls(**kwargs)
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
    except UserError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for note in getattr(config, "notes", ()):  # old spellings read as new ones: said once
        print(f"note: {note}", file=sys.stderr)
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> T:
    """YAML file (optional) then command-line overrides, validated before anything loads."""
    values: dict[str, Any] = {}
    where = "config"
    if path is not None:
        values.update(load_yaml(path))
        where = str(path)
        types_ = _field_types(cls)
        for key in values:
            if key not in types_:
                raise _unknown_key_error(key, list(types_), where)
    extra = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    types_ = _field_types(cls)
    for key in extra:
        if key not in types_:
            raise _unknown_key_error(key, list(types_), "command line")
    values.update(extra)
    return config_from_dict(cls, values, where)


def is_secret(f: dataclasses.Field) -> bool:
    """A field never written or logged (``metadata={"secret": True}``, e.g. ``hub_token``)."""
    return bool(f.metadata.get("secret"))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-able dict of a config dataclass (secret fields left out: this dict goes to
    model cards, trackers and fingerprints)."""
    out = {}
    for f in dataclasses.fields(config):
        if is_alias(f) or is_secret(f):
            continue
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def field_docs(cls: type) -> dict[str, str]:
    """One line of help per field, read from the dataclass's source: the comment after the
    field (``name: int = 1  # what it is``) or the ``#:`` lines just above it. Read from the
    code itself, so ``--help`` cannot drift from it."""
    import inspect
    import io
    import tokenize

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above: list[str] = []
        line_of_field: dict[int, str] = {}
        lines = source.splitlines()
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith("#:"):
                above.append(stripped[2:].strip())
                continue
            name = stripped.split(":", 1)[0].strip() if ":" in stripped else ""
            if name.isidentifier() and not stripped.startswith(("def ", "class ", "return", "#")) and (
                    name in {f.name for f in dataclasses.fields(cls)}):
                line_of_field[number] = name
                if above:
                    docs[name] = " ".join(above)
            above = []
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and tok.start[0] in line_of_field:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith(("noqa", "type:")):
                    docs[line_of_field[tok.start[0]]] = text
    return docs


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "").replace("NoneType", "None")


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` of every key a config file or ``--key`` may set."""
    types_ = _field_types(cls)
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if is_alias(f):
            help_text = f"older name of {f.metadata['alias_of']} (still read)"
        else:
            help_text = docs.get(f.name, "")
        shown = "null" if default is None else ("''" if default == "" else default)
        rows.append((f.name, _type_name(types_[f.name]), str(shown), help_text))
    return rows
