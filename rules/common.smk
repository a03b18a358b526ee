# Helpers shared by the rule files (included first). The config is checked here, before any rule reads it.
from pathlib import Path

from omni_model.config import check_config_or_exit

check_config_or_exit(config, Path(workflow.basedir, "config", "schema.yaml"))


def canonical(value):
    """A config section with its keys sorted, recursively. Snakemake compares params by their repr, so without
    this, reordering keys in a config file would rerun a stage whose settings did not change."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value


# Work folders a killed job leaves behind (a job that finishes removes its own): removed when a run starts. Only
# these names; the hub download's `.partial` folder is kept on purpose (the next download resumes from it).
LEFTOVER_GLOBS = ("results/data/dj-run-*", "results/*.staging", "results/*/*.staging", "results/*/*/*.staging",
                  "results/*/*.old", "results/*/*/*.old")


def remove_leftovers():
    import glob
    import os
    import shutil

    for pattern in LEFTOVER_GLOBS:
        for path in glob.glob(pattern):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            print(f"removed the leftover of an interrupted job: {path}")
