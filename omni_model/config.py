"""The pipeline config: coerce command-line strings by the schema, fill defaults, validate, check named inputs.

    config = check_config(config, "config/schema.yaml")   # raises ConfigError with one line per problem

Snakemake passes a nested `--config data='{max_seq_len: 8192}'` through YAML's BaseLoader, so every nested value
arrives as a string ('8192'). We coerce a string to the type the schema asks for (integer, number, boolean, null)
before validating: '8192' -> 8192, '1e-5' -> 1e-05, 'true' -> True; a string that is not such a value ('4k') stays a
string and the validator names the key and the expected type. Every message is one line: key path, value, what is
allowed; never the schema or the config.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from .schema import schema_problems, schema_types

BUILTIN_MODEL_CONFIGS = ("released-30b-a3b",)


class ConfigError(ValueError):
    """The config is wrong; the message holds one line per problem."""


# ------------------------------------------------------------------------------------------------ coercion
_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _scalar_from_string(text: str, types: list[str]):
    """The value of `text` as one of the schema's non-string types, or `text` itself when none fits."""
    stripped = text.strip()
    if "null" in types and stripped.lower() in ("null", "none", "~", ""):
        return None
    if "boolean" in types and stripped.lower() in _BOOLEANS:
        return _BOOLEANS[stripped.lower()]
    if "integer" in types:
        try:
            return int(stripped.replace("_", ""))
        except ValueError:
            pass
    if "number" in types:
        try:
            number = float(stripped.replace("_", ""))  # float() reads 1e-5; YAML 1.1 would keep it a string
            return int(number) if number.is_integer() and re.fullmatch(r"[+-]?\d+", stripped) else number
        except ValueError:
            pass
    return text


def _untyped_from_string(text: str):
    """A free-form value (e.g. model.overrides): what the same text in a YAML file would have been."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool)) and not isinstance(value, str) else text


def coerce(value, schema: dict):
    """`value` with every string converted to the type `schema` asks for (recursively)."""
    types = schema_types(schema)
    if isinstance(value, str):
        if not types:
            return _untyped_from_string(value)
        if "string" in types:
            return value
        if "array" in types or "object" in types:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                return value
            return coerce(parsed, schema) if isinstance(parsed, (list, dict)) else value
        return _scalar_from_string(value, types)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {key: coerce(item, props.get(key, extra if isinstance(extra, dict) else {}))
                for key, item in value.items()}
    if isinstance(value, list):
        return [coerce(item, schema.get("items", {})) for item in value]
    return value


def fill_defaults(config: dict, schema: dict) -> dict:
    """Missing keys take the schema's defaults, section by section (a section's default {} is filled too)."""
    for key, sub in schema.get("properties", {}).items():
        if key not in config and "default" in sub:
            config[key] = _copy(sub["default"])
        if isinstance(config.get(key), dict) and sub.get("properties"):  # a wrong type is left to the validator
            fill_defaults(config[key], sub)
    return config


def _copy(value):
    return yaml.safe_load(yaml.safe_dump(value))


# ------------------------------------------------------------------------------------------------ validation
# schema_problems (the one-line messages) lives in omni_model.schema, beside the typed sections that use it too


def semantic_problems(config: dict) -> list[str]:
    """Rules the schema cannot say."""
    from .train.settings import context_parallel_problem

    problem = context_parallel_problem(config.get("parallel", {}), config.get("train", {}),
                                       bool(config.get("model", {}).get("use_te", False)))
    return [problem] if problem else []


# ------------------------------------------------------------------------------------------------ inputs
WORKFLOW_FILES = (("data", "recipe"),)  # config values that may name a file shipped with the workflow


def resolve_workflow_files(config: dict, workflow_dir: Path, root: Path = Path(".")) -> None:
    """A relative path that does not exist in the working directory but names a file shipped with the workflow (the
    default recipe) is made absolute next to the workflow: ``snakemake -s path/Snakefile -d elsewhere`` runs the
    default config. A file in the working directory wins."""
    for section, key in WORKFLOW_FILES:
        value = config.get(section, {}).get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and not (root / value).exists() \
                and (Path(workflow_dir) / value).is_file():
            config[section][key] = str((Path(workflow_dir) / value).resolve())


def input_problems(config: dict, root: Path = Path(".")) -> list[str]:
    """Files and folders the config names must exist (relative paths are relative to the working directory)."""
    problems = []
    data, model = config.get("data", {}), config.get("model", {})

    def need(key: str, value: str, kind: str) -> None:
        path = root / value
        ok = path.is_file() if kind == "file" else path.is_dir()
        if not ok:
            what = "no such file" if not path.exists() else f"not a {kind}"
            problems.append(f"{key} = {value!r}: {what} ({path.resolve()})")

    if data.get("raw", "demo") != "demo":
        need("data.raw", data["raw"], "file")
    if "recipe" in data:
        need("data.recipe", data["recipe"], "file")
    if model.get("source") == "local" and model.get("path"):
        need("model.path", model["path"], "folder")
    if model.get("source") == "random" and model.get("config") not in (None, *BUILTIN_MODEL_CONFIGS):
        need("model.config", model["config"], "file")
    return problems


# ------------------------------------------------------------------------------------------------ DJ recipe
def _dj_registry_cache() -> Path | None:
    """Where Data-Juicer's registry is cached: one file per installed Data-Juicer version and content of our ops
    module (data/dj_ops.py registers ops into the same registry); None when Data-Juicer is not installed."""
    import hashlib
    import importlib.metadata
    import os

    try:
        version = importlib.metadata.version("py-data-juicer")
    except importlib.metadata.PackageNotFoundError:
        return None
    ours = hashlib.sha256((Path(__file__).parent / "data" / "dj_ops.py").read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omni-pipeline"
    return root / f"dj-ops-{version}-{ours}.json"


def dj_op_registry() -> dict[str, list[str]]:
    """{op name: keyword arguments its constructor accepts} from Data-Juicer's own registry (data/dj_registry.py, run
    in a child process: the import takes ~15 s), cached per version (_dj_registry_cache) so that planning reads a
    file. {} when Data-Juicer is not installed (the GPU machines: recipe_problems then leaves the op names alone)."""
    import json
    import os
    import subprocess

    cache = _dj_registry_cache()
    if cache is None:
        return {}
    if cache.is_file():
        return json.loads(cache.read_text())
    print(f"reading Data-Juicer's op registry (once per version; cached in {cache})", file=sys.stderr, flush=True)
    found = subprocess.run([sys.executable, "-m", "omni_model.data.dj_registry"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    if found.returncode != 0:
        raise RuntimeError(f"reading Data-Juicer's op registry failed:\n{found.stderr[-4000:]}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    partial.write_text(found.stdout)
    partial.replace(cache)  # atomic: a concurrent planner reads the old state or the whole new file
    return json.loads(found.stdout)


class OpCatalog:
    """The Data-Juicer ops a recipe may name, with the keyword arguments each accepts (Data-Juicer's registry)."""

    def __init__(self, registry: dict[str, list[str]] | None = None):
        self.ops: dict[str, set[str]] = {name: set(args) for name, args in
                                         (dj_op_registry() if registry is None else registry).items()}

    def problems(self, op: str, args: dict) -> list[str]:
        if op not in self.ops:
            close = difflib.get_close_matches(op, list(self.ops), n=1)
            return [f"unknown op '{op}'" + (f"; did you mean '{close[0]}'?" if close else "")]
        allowed = self.ops[op]
        lines = []
        for name in sorted(set(args) - allowed):
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            lines.append(f"op '{op}': unknown argument '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        return lines


def recipe_problems(recipe_path: Path, catalog: OpCatalog | None = None) -> list[str]:
    """Problems of a Data-Juicer recipe: structure, op names, argument names (one line each, naming the file)."""
    recipe_path = Path(recipe_path)
    try:
        recipe = yaml.safe_load(recipe_path.read_text())
    except yaml.YAMLError as exc:
        return [f"data.recipe {recipe_path}: not valid YAML ({str(exc).splitlines()[0]})"]
    if not isinstance(recipe, dict) or not isinstance(recipe.get("process"), list) or not recipe["process"]:
        return [f"data.recipe {recipe_path}: needs a non-empty 'process' list of ops"]
    if catalog is None and _dj_registry_cache() is None:
        # a machine that only trains on data prepared elsewhere (a GPU node without Data-Juicer): the op names cannot
        # be checked here, and no job here reads them; the datajuicer job itself stops on the missing package
        print(f"note: Data-Juicer is not installed here: the op names of {recipe_path} are not checked",
              file=sys.stderr)
        return []
    if catalog is None:
        catalog = OpCatalog()
    lines = []
    for index, entry in enumerate(recipe["process"]):
        if not isinstance(entry, dict) or len(entry) != 1:
            lines.append(f"data.recipe {recipe_path}: process[{index}] must be one 'op_name: {{args}}' mapping")
            continue
        (op, args), = entry.items()
        if args is not None and not isinstance(args, dict):
            lines.append(f"data.recipe {recipe_path}: process[{index}] {op}: arguments must be a mapping")
            continue
        lines += [f"data.recipe {recipe_path}: process[{index}] {line}" for line in catalog.problems(op, args or {})]
    return lines


# ------------------------------------------------------------------------------------------------ all together
def check_config(config: dict, schema_path, root: Path = Path(".")) -> dict:
    """Coerce, fill defaults, validate and check the named inputs; returns the config (changed in place)."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    coerced = coerce(config, schema)
    config.clear()
    config.update(coerced)
    fill_defaults(config, schema)
    resolve_workflow_files(config, Path(schema_path).resolve().parent.parent, root)  # schema: <workflow>/config/
    problems = schema_problems(config, schema)
    if not problems:
        problems = semantic_problems(config)
    if not problems:
        problems = input_problems(config, root)
    if not problems and "recipe" in config.get("data", {}):
        problems = recipe_problems(root / config["data"]["recipe"])
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def check_config_or_exit(config: dict, schema_path) -> dict:
    """For the Snakefile: check_config + (model.source local) the checkpoint's headers; on a problem end the run
    before any job with the problem lines only (no traceback, no schema or config dump)."""
    from .download import CheckpointError, check_local_checkpoint

    try:
        check_config(config, schema_path)
    except ConfigError as error:
        exit_with("Config error", error)
    if config["model"]["source"] == "local":
        try:  # headers only (config, index, safetensors shapes, tokenizer, preprocessor): milliseconds even at 30B
            check_local_checkpoint(Path(config["model"]["path"]))
        except CheckpointError as error:
            exit_with("model.path is not a usable Qwen3-Omni checkpoint", error)
    return config


def exit_with(title: str, error) -> None:
    """End the run before any job: the title and the problem lines only (no traceback, no schema or config dump)."""
    lines = "\n".join(f"  {line}" for line in str(error).splitlines())
    raise SystemExit(f"{title} (nothing was run):\n{lines}\n(see README.md, 'Troubleshooting')")


# ------------------------------------------------------------------------------------------------ rule params
def canonical(value):
    """A config value with its mappings' keys sorted, recursively: Snakemake compares params by their repr, so without
    this, reordering keys in a config file would rerun a stage whose settings did not change."""
    if isinstance(value, Mapping):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value


class Section(Mapping):
    """A config section as the rule's script reads it (`snakemake.params.train["lr"]`, `dict(...)`). Not a dict on
    purpose: Snakemake compares only params of builtin types, so this whole-section copy is not compared; the
    per-key params of `section_params` are, and a change names its keys."""

    def __init__(self, values: Mapping):
        self._values = canonical(values)

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Section({self._values!r})"


def section_params(**sections: Mapping) -> dict:
    """A rule's params for the config sections its script reads: each section whole (`name`, a Section), and one
    param per key whose value names it (`name__key` = "train.lr = 0.001"). Snakemake's rerun reason lists the params
    that differ, so a setting change reads `before: 'train.lr = 0.001' now: 'train.lr = 0.0001'`, not two whole
    sections."""
    params = {}
    for name, section in sections.items():
        params[name] = Section(section)
        params.update({f"{name}__{key}": f"{name}.{key} = {value!r}" for key, value in params[name].items()})
    return params
