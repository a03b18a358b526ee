# Helpers shared by the rule files (included first). The config is checked here, before any rule reads it.
import os
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import ExecMode

from omni_model.config import check_config_or_exit, exit_with, section_params
from omni_model.plan import finetune_problems

check_config_or_exit(config, Path(workflow.basedir, "config", "schema.yaml"))


def data_params(*keys):
    """The data keys a rule's script reads, as section_params (`snakemake.params.data[key]`): a change reruns only the
    rules that read the key, and the rerun reason names it."""
    return section_params(data={key: config["data"][key] for key in keys})


def jobs_run_here():
    """Whether this snakemake runs (or, with -n, would run) its jobs on this machine rather than submitting them.
    Snakemake refuses a cluster executor without --jobs N (`--profile slurm` sets jobs: 16), while a local run turns
    --jobs into --cores; only a dry run keeps --jobs, so a dry run with --jobs is taken for a cluster plan."""
    plugin = workflow.executor_plugin
    if plugin.common_settings.dryrun_exec:
        return workflow.resource_settings.nodes is None
    return plugin.common_settings.local_exec


def finetune_plan_checks(wildcards):
    """Input function of `finetune` (it names no file): the checks of its job that need no earlier stage, run while
    Snakemake builds the DAG, so `snakemake -n` and a run stop before any job when finetune is in the plan (and a
    target without it, e.g. `shards`, is not held up). Skipped where nothing will run (--report, --lint) and inside
    a cluster job (the submitting snakemake checked)."""
    if workflow.executor_plugin is None or workflow.workflow_settings.exec_mode != ExecMode.DEFAULT:
        return []
    problems = finetune_problems(config, runs_here=jobs_run_here())
    if problems:
        exit_with("finetune cannot run with this config", "\n".join(problems))
    return []


def finetune_host_resources(train):
    """(threads, mem_mb) of one finetune node. GPU: per GPU rank the rank and its loader processes
    (train.data_workers, 4 by default) as CPUs and 32 GB of host memory (its loader workers' decoded media, pinned
    batches, checkpoint I/O); CPU: train.cpu_procs ranks in 16 GB."""
    from omni_model.train.settings import TrainSettings

    settings = TrainSettings(hf_dir="", init_checkpoint="", shards="", train_dir="", train=dict(train))
    train = settings.train
    if not settings.on_gpu:
        return max(1, train.cpu_procs), 16000
    return train.gpus_per_node * (1 + settings.data_workers), train.gpus_per_node * 32000


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


def items_current(rule_name):
    """Input function (it names no file) of a report rule: under `snakemake --report` (nothing runs: no executor;
    Snakemake's API tells a DAG nothing else about report mode, the command line does), refuse this rule's items
    when one is missing or older than what it reports on, naming the command that remakes them."""

    def check(wildcards):
        if workflow.executor_plugin is not None or not any(
            arg == "--report" or arg.startswith("--report=") for arg in sys.argv
        ):
            return []
        proxy = getattr(rules, rule_name)
        sources = [str(path) for path in proxy.input if isinstance(path, str) and os.path.exists(path)]
        stale = stale_items([str(path) for path in proxy.output], sources)
        if stale:
            raise SystemExit(
                f"The report items of {rule_name} are missing or older than what they report on "
                f"({', '.join(sources)}): {', '.join(stale)}.\nRun `snakemake --cores all --force {rule_name}`, then "
                f"--report again (--force: Snakemake reruns a rule only when an input's content changed, and a stage "
                f"that ran again may have written the same bytes)."
            )
        return []

    return check


def modified_time(path):
    """Snakemake's view of a path's age: a directory output by its .snakemake_timestamp (what Snakemake compares)."""
    stamp = os.path.join(path, ".snakemake_timestamp")
    return os.path.getmtime(stamp if os.path.isdir(path) and os.path.exists(stamp) else path)


def stale_items(items, sources):
    """The items that are missing or older than the newest of `sources` (existing paths)."""
    newest = max((modified_time(path) for path in sources), default=0.0)
    return [item for item in items if not os.path.exists(item) or modified_time(item) < newest]


def evaluated_inputs(wildcards):
    """evaluate_model's inputs for one model (rules/evaluate.smk): its weights and HF checkpoint, eval.data's."""
    if wildcards.model == "tuned" and "done" not in EXPORT_OUTPUTS:
        exit_with("evaluate cannot run with this config", "the tuned answers are generated from the merged export, "
                  "and export.lora = adapter writes none: set export.lora: both")
    return dict(EVALUATED_WEIGHTS[wildcards.model], **EVAL_DATA_INPUT)
