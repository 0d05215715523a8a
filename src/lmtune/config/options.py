"""Config fields and their loading: `opt` declares a field (default, help, choices, range), and a config
is built from defaults, then a YAML file, then the command line, every value checked.

A mistake raises `LmtuneError` with one line (and a close-match suggestion for a misspelt key). This module
imports nothing heavy: `lmtune --help` must stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from lmtune.errors import LmtuneError


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, required: bool = False):
    """A config field: its default, its documentation, and the values it accepts."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "required": required}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def fields_of(cls) -> dict[str, dataclasses.Field]:
    """The config's fields by name; a later (subclass) definition of a name wins."""
    return {f.name: f for f in dataclasses.fields(cls)}


def type_of(cls, name: str) -> type:
    """The field's type (the annotation, resolved)."""
    hints = typing.get_type_hints(cls)
    return hints[name]


def coerce(cls, key: str, value: Any, where: str) -> Any:
    """Check (and for command-line strings, convert) one value; raise a one-line error if it is wrong."""
    fields = fields_of(cls)
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        hint = f", did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
        raise LmtuneError(f"{where}: unknown key '{key}'{hint}")
    f, typ = fields[key], type_of(cls, key)
    if isinstance(value, str) and typ is not str:
        value = _parse_string(value, typ, key, where)
    ok = (typ is bool and isinstance(value, bool)) or \
         (typ is int and isinstance(value, int) and not isinstance(value, bool)) or \
         (typ is float and isinstance(value, (int, float)) and not isinstance(value, bool)) or \
         (typ is str and isinstance(value, str)) or \
         (typ in (dict, list) and isinstance(value, typ))  # sweep's train/space mappings, YAML only
    if not ok:
        raise LmtuneError(f"{where}: key '{key}' must be {typ.__name__}, got {value!r}")
    if typ is float:
        value = float(value)
        if not math.isfinite(value):  # nan passes every range check and fails (or trains on garbage) later
            raise LmtuneError(f"{where}: key '{key}' must be a finite number, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise LmtuneError(f"{where}: key '{key}' must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise LmtuneError(f"{where}: key '{key}' must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise LmtuneError(f"{where}: key '{key}' must be <= {meta['max']}, got {value!r}")
    return value


def _parse_string(text: str, typ: type, key: str, where: str) -> Any:
    try:
        if typ in (dict, list):  # mappings and lists come from the YAML file only
            raise ValueError
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(text)
    except ValueError:
        raise LmtuneError(f"{where}: key '{key}' must be {typ.__name__}, got {text!r}") from None


def read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LmtuneError(f"config file {path} not found: check the path given to --config")
    try:
        from lmtune.files import read_text

        data = yaml.safe_load(read_text(p, "config file")) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f":{line + 1}" if line is not None else ""
        raise LmtuneError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LmtuneError(f"{path}: a config must be a mapping of key: value, got {type(data).__name__}")
    return data


def build(cls, file_values: dict, file_name: str, cli_values: dict):
    """Defaults, then the YAML file, then the command line; every value checked."""
    values = {}
    for key, value in file_values.items():
        values[key] = coerce(cls, key.replace("-", "_"), value, file_name)
    for key, value in cli_values.items():
        values[key] = coerce(cls, key, value, "command line")
    missing = [k for k, f in fields_of(cls).items() if f.metadata.get("required") and not values.get(k)]
    if missing:
        flags = " ".join(f"--{k.replace('_', '-')} ..." for k in missing)
        empty = [k for k in missing if k in values]  # given, but as "" (e.g. --prompt "" from an unset variable)
        what = f"required setting {', '.join(empty)} is empty" if empty == missing else \
            f"missing required setting {', '.join(missing)}"
        raise LmtuneError(f"{what}: give {flags} (or put it in --config)")
    cfg = cls(**{k.replace("-", "_"): v for k, v in values.items()})
    cfg._config_file = file_name  # an input too: no output may overwrite it (not a field: not in run.json)
    check_settings(cfg)
    return cfg


def check_settings(cfg) -> None:
    """Checks across fields, at parse time (before any file is read or written)."""
    if getattr(cfg, "resume", False) and getattr(cfg, "overwrite", False):
        raise LmtuneError("--resume continues the run in --out and --overwrite replaces it: give one of them")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
