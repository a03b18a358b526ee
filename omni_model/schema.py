"""The pipeline config's schema (config/schema.yaml): where it is, its one-line problem messages, and the typed
sections whose defaults it holds.

    train = TrainConfig.of({"lr": 3e-4})        # every other key the schema's default; train.lr, train.lora.rank
    TrainConfig.of({"lr": "fast"})              # SectionError: train.lr = 'fast': expected a number
    TrainConfig.of({"lrr": 1})                  # SectionError: train.lrr: unknown key; did you mean 'lr'? ...

The schema is the one source of the keys, their types and defaults: the section classes are made from it (a field per
property, its default the schema's), and a section is built only from values the schema validates, so an unknown key
or a wrong type is refused with the same message the workflow's config check gives. No omni_model imports here: the
config check, the training settings and the Snakefile all read it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"


class SectionError(ValueError):
    """A config section the schema refuses; one line per problem."""


@functools.lru_cache(maxsize=None)
def load_schema(path: Path = SCHEMA_PATH) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: the config schema is not there (omni_model reads it from its checkout, "
                                f"config/schema.yaml beside the package: install with `pip install -e .`)")
    return yaml.safe_load(Path(path).read_text())


def schema_types(schema: dict) -> list[str]:
    kind = schema.get("type", [])
    return [kind] if isinstance(kind, str) else list(kind)


_TYPE_WORDS = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string",
               "object": "a mapping {key: value}", "array": "a list", "null": "null"}


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _allowed(error) -> str:
    """What the schema allows at the failing key, in words."""
    kind, value, schema = error.validator, error.validator_value, error.schema
    if kind == "type":
        return "expected " + " or ".join(_TYPE_WORDS.get(t, t) for t in schema_types({"type": value}))
    if kind == "enum":
        return "must be one of: " + ", ".join(map(str, value))
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return "must be " + _range(schema)
    if kind == "pattern":
        return f"must match {value}" + (f" ({schema['description']})" if "description" in schema else "")
    return error.message


def _range(schema: dict) -> str:
    low = (">= %s" % schema["minimum"]) if "minimum" in schema else \
        (("> %s" % schema["exclusiveMinimum"]) if "exclusiveMinimum" in schema else "")
    high = ("<= %s" % schema["maximum"]) if "maximum" in schema else \
        (("< %s" % schema["exclusiveMaximum"]) if "exclusiveMaximum" in schema else "")
    return " and ".join(part for part in (low, high) if part)


def _describe(error) -> list[str]:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        lines = []
        for key in extra:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            section = f"{where}.{key}" if error.absolute_path else key
            lines.append(f"{section}: unknown key; {hint}known keys: {', '.join(known)}")
        return lines
    if error.validator == "required":
        missing = re.match(r"'([^']+)'", error.message)
        name = missing.group(1) if missing else error.message
        prefix = f"{where}." if error.absolute_path else ""
        return [f"{prefix}{name}: required here but not set"]
    return [f"{where} = {error.instance!r}: {_allowed(error)}"]


def schema_problems(config: dict, schema: dict) -> list[str]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    lines: list[str] = []
    for error in errors:
        if error.validator in ("if", "then"):
            continue
        for line in _describe(error):
            if line not in lines:
                lines.append(line)
    return lines



# ------------------------------------------------------------------------------------------------ typed sections
_PYTHON_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str, "array": tuple, "object": dict}


def _annotation(schema: dict) -> Any:
    kinds = [_PYTHON_TYPES[t] for t in schema_types(schema) if t in _PYTHON_TYPES]
    kind = kinds[0] if len(kinds) == 1 else Any
    return Optional[kind] if "null" in schema_types(schema) else kind


def _frozen(value):
    """A schema default as a field value: lists become tuples (a frozen section holds no mutable default)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _thawed(value):
    """A field value as the config holds it (tuples back to lists), for validation and JSON."""
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    if dataclasses.is_dataclass(value):
        return value.as_dict()
    return value


class Section:
    """Base of the typed sections: `of(values)` validates and fills defaults; `as_dict()` gives the config mapping."""

    SECTION: str = ""  # the key path in the config, e.g. "train" or "train.lora"

    @classmethod
    def of(cls, values=None):
        """The section of a config mapping (missing keys: the schema's defaults); an instance passes through."""
        if isinstance(values, cls):
            return values
        values = _thawed_mapping(values)
        problems = _section_problems(cls.SECTION, values)
        if problems:
            raise SectionError("\n".join(problems))
        nested = {f.name: f.metadata["section"] for f in dataclasses.fields(cls) if "section" in f.metadata}
        return cls(**{key: nested[key].of(value) if key in nested else _frozen(value) for key, value in values.items()})

    def as_dict(self) -> dict:
        return {f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _thawed_mapping(value) -> Any:
    if value is None:
        return {}
    return {k: _thawed(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _section_problems(path: str, values) -> list[str]:
    """The schema's problems with one section's values, named by their full key path (train.lora.rank = ...)."""
    schema = section_schema(path)
    for key in reversed(path.split(".")):
        values, schema = {key: values}, {"type": "object", "properties": {key: schema}}
    return schema_problems(values, schema)


def section_schema(path: str, schema: Optional[dict] = None) -> dict:
    """The schema of the section at `path` ("train", "train.lora") in `schema` (default: config/schema.yaml)."""
    schema = schema if schema is not None else load_schema()
    for key in path.split("."):
        schema = schema["properties"][key]
    return schema


def section_class(path: str, name: str, nested: Optional[dict] = None, schema: Optional[dict] = None) -> type:
    """A frozen dataclass of the schema section at `path`: a field per property, typed and defaulted by the schema
    (`schema`, default config/schema.yaml); `nested` {key: Section class} for sub-sections (train.lora)."""
    nested = nested or {}
    section = section_schema(path, schema)
    fields = []
    for key, prop in section.get("properties", {}).items():
        if key in nested:
            fields.append((key, nested[key], dataclasses.field(default_factory=nested[key],
                                                               metadata={"section": nested[key]})))
        elif isinstance(prop.get("default"), dict):  # a free-form mapping (or a sub-section not typed here)
            fields.append((key, _annotation(prop), dataclasses.field(default_factory=functools.partial(
                copy.deepcopy, prop["default"]))))
        elif "default" in prop:
            fields.append((key, _annotation(prop), dataclasses.field(default=_frozen(prop["default"]))))
        else:
            fields.append((key, _annotation(prop), dataclasses.field(default=None)))
    doc = section.get("description") or f"The `{path}` section of config/schema.yaml."
    cls = dataclasses.make_dataclass(name, fields, bases=(Section,), frozen=True, namespace={"SECTION": path,
                                                                                            "__doc__": doc})
    cls.__module__ = __name__
    return cls


LoraConfig = section_class("train.lora", "LoraConfig")
TrainConfig = section_class("train", "TrainConfig", nested={"lora": LoraConfig})
ParallelConfig = section_class("parallel", "ParallelConfig")
DataConfig = section_class("data", "DataConfig")
