# Stage 5: Megatron-Core fine-tuning of the thinker under torchrun (GPUs of the rule, or train.cpu_procs on CPU).
# results/train/ holds `latest` (names the last complete iter_NNNNNNN/ checkpoint), metrics.jsonl, the iter_*
# checkpoints and tb/. The declared output is the marker `train.done` beside it, written when the run succeeded (as
# `shards`'s, rules/data.smk): Snakemake deletes declared outputs before a job and after a failure, so nothing in the
# folder is declared; a failed rerun leaves `latest` and metrics.jsonl as they were, and the next rerun resumes from
# the checkpoints when the run's settings digest matches. Layouts and batch sizes that cannot train (e.g. parallel.cp > 1
# without packing, a pipeline split without the deepstack layers on the first stage) stop the plan here.

from omni_model.plan import known_model_config
from omni_model.train.settings import SettingsError, check_config as check_train_config
from omni_model.train.talker_run import check_talker_plan

try:
    # the pipeline split (parallel.first_stage_layers) is checked against the model's layers here, before convert,
    # when the model's config is known before any job (else in the job)
    check_train_config(config["train"], config["parallel"], hf_config=known_model_config(config),
                       use_te=config["model"]["use_te"])
    check_talker_plan(config)  # finetune_talker's settings (train_talker over train); at pp / cp it trains no talker
except SettingsError as error:
    raise SystemExit(f"Config error (nothing was run):\n  {error}")


rule finetune:
    input:
        convert=rules.convert.output.done,
        shards=rules.shards.output.done,
        plan_checks=finetune_plan_checks,  # no file: refuses a run that cannot fit or has no GPU here (common.smk)
    output:
        done="results/train.done",
    params:
        use_te=config["model"]["use_te"],
        **section_params(train=config["train"], parallel=config["parallel"]),
        # data: the encoder settings the shards were written with (the task encoder must encode the same way)
        **data_params("max_seq_len", "use_audio_in_video", *VIDEO_SETTINGS),
    log:
        "logs/finetune.log",
    benchmark:
        "benchmarks/finetune.tsv"
    threads: finetune_host_resources(config["train"])[0]
    # Slurm (snakemake-executor-plugin-slurm): train.nnodes nodes, one task = one torchrun agent per node (started by
    # omni_model.runtime.launch). One node: `gpu` -> sbatch --gpus, a job total. Several nodes: `gres` gpu:N, because
    # sbatch --gres counts per node (--gpus would spread N over all nodes). `tasks` stays 0 on GPU jobs, where the
    # plugin would turn it into --ntasks-per-gpu.
    resources:
        mem_mb=finetune_host_resources(config["train"])[1],
        nodes=config["train"]["nnodes"],
        tasks=0 if config["train"]["gpus_per_node"] else config["train"]["nnodes"],
        gpu=config["train"]["gpus_per_node"] if config["train"]["nnodes"] == 1 else 0,
        gres=f"gpu:{config['train']['gpus_per_node']}" if config["train"]["gpus_per_node"] and config["train"]["nnodes"] > 1 else "",
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/finetune.py"


# Stage 5b: the talker (speech output) trained on the spoken answers of the shards, its inputs built by the tuned
# thinker (results/train's `latest`, frozen) exactly as transformers' generate builds them (omni_model.train.talker_run,
# under torchrun like finetune, the same layouts without pp/cp). results/train_talker/ holds `latest`, metrics.jsonl,
# iter_* checkpoints, tb/; the declared output is the marker `train_talker.done` beside it (as finetune's). With
# train_talker.iters 0, no spoken answer in the shards, or a LoRA thinker run, nothing is trained, `latest` is removed
# and export carries the source talker (the log says that speech was not re-aligned to the tuned thinker).
rule finetune_talker:
    input:
        train=rules.finetune.output.done,
        convert=rules.convert.output.done,
        shards=rules.shards.output.done,
        hf_manifest="results/model/hf/MANIFEST.json",
    output:
        done="results/train_talker.done",
    params:
        use_te=config["model"]["use_te"],
        **section_params(train=config["train"], train_talker=config["train_talker"], parallel=config["parallel"]),
        **data_params("max_seq_len", "use_audio_in_video", *VIDEO_SETTINGS),
    log:
        "logs/finetune_talker.log",
    benchmark:
        "benchmarks/finetune_talker.tsv"
    threads: finetune_host_resources(config["train"])[0]
    resources:
        mem_mb=finetune_host_resources(config["train"])[1],
        nodes=config["train"]["nnodes"],
        tasks=0 if config["train"]["gpus_per_node"] else config["train"]["nnodes"],
        gpu=config["train"]["gpus_per_node"] if config["train"]["nnodes"] == 1 else 0,
        gres=f"gpu:{config['train']['gpus_per_node']}" if config["train"]["gpus_per_node"] and config["train"]["nnodes"] > 1 else "",
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/finetune_talker.py"
