# omni-pipeline: fine-tune Qwen3-Omni with Megatron-Core.
#   download -> datajuicer -> shards -> convert -> finetune -> export
# The config is validated (and defaults filled) before any job runs: a wrong key, type or value stops here.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml", set_default=True)


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/data.smk"
include: "rules/convert.smk"
include: "rules/finetune.smk"
include: "rules/export.smk"


rule all:
    default_target: True
    input:
        rules.download.output.manifest,
        rules.shards.output,
        rules.convert.output,
        rules.finetune.output,
        rules.export.output,
