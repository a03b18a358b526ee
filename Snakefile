# omni-pipeline: fine-tune Qwen3-Omni with Megatron-Core.
#   download -> datajuicer -> shards -> convert -> finetune -> finetune_talker -> export -> evaluate   (+ the report items of each stage)
# The config is coerced, validated (defaults filled) and the files it names are checked before any job runs:
# a wrong key, type, value, path or recipe op stops here with one line per problem, and nothing is run.

from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# The default config: the working directory's config/config.yaml, else the workflow's own, so that
# `snakemake -s path/to/Snakefile` run from another directory (or with -d elsewhere) runs the default.
DEFAULT_CONFIG = "config/config.yaml"


configfile: DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else Path(workflow.basedir, DEFAULT_CONFIG)


# common.smk checks the config (coerce, validate, defaults, named files, recipe, local checkpoint) first of all.
include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/data.smk"
include: "rules/convert.smk"
include: "rules/finetune.smk"
include: "rules/export.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/plan.smk"


onstart:
    remove_leftovers()


# Every stage's contract outputs are targets, so a deleted or interrupted output is made again.
rule all:
    default_target: True
    input:
        rules.download.output,
        rules.datajuicer.output,
        rules.shards.output,
        rules.convert.output,
        rules.finetune.output,
        rules.finetune_talker.output,
        rules.export.output,
        rules.evaluate.input,
        rules.report_data.output,
        rules.report_convert.output,
        rules.report_finetune.output,
        rules.report_evaluate.output,
