"""Data-Juicer's own op registry, as the plan-time recipe check needs it: op name -> the keyword arguments its
constructor accepts. Read from `OPERATORS` after Data-Juicer has loaded every op (and ours, data/dj_ops.py), in a
child process: the import takes ~15 s and sets up Data-Juicer's logging, neither of which belongs in Snakemake's
planning process. `config.OpCatalog` caches the result per Data-Juicer version and dj_ops.py content.

    python -m omni_model.data.dj_registry     # prints the registry as JSON
"""

from __future__ import annotations

import inspect
import json
import re
import sys

# Data-Juicer's op base classes (data_juicer/ops/base_op.py): their __init__ takes *args, **kwargs and reads its
# keyword arguments with kwargs.get(...) / kwargs[...]
_BASE_CLASSES = ("OP", "Filter", "Mapper", "Deduplicator", "Selector", "Grouper", "Aggregator")


def base_kwargs() -> set[str]:
    """The keyword arguments every op accepts: those OP.__init__ and Filter.__init__ read from **kwargs."""
    from data_juicer.ops import base_op

    source = inspect.getsource(base_op.OP.__init__) + inspect.getsource(base_op.Filter.__init__)
    return set(re.findall(r"kwargs(?:\.get|\.pop)?\(?\[?\s*[\"'](\w+)[\"']", source))


def op_arguments(cls, common: set[str]) -> list[str]:
    """Every keyword `cls(...)` accepts: its __init__'s named parameters, and while an __init__ takes **kwargs, those
    of the next class in its MRO that defines one, down to Data-Juicer's base classes (`common`)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass.__name__ in _BASE_CLASSES and klass.__module__ == "data_juicer.ops.base_op":
            return sorted(names | common)
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return sorted(names)
    return sorted(names | common)


def registry() -> dict[str, list[str]]:
    """{op name: sorted keyword arguments} of every op in Data-Juicer's registry, ours included."""
    from data_juicer.ops import load_ops  # noqa: F401  (importing data_juicer.ops registers every op)
    from data_juicer.ops.base_op import OPERATORS

    from . import dj_ops  # noqa: F401  (registers ours)

    common = base_kwargs()
    return {name: op_arguments(cls, common) for name, cls in sorted(OPERATORS.modules.items())}


if __name__ == "__main__":
    json.dump(registry(), sys.stdout)
