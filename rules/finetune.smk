# Stage 5: Megatron-Core fine-tuning of the thinker under torchrun (GPUs of the rule, or train.cpu_procs on CPU).


rule finetune:
    input:
        convert=rules.convert.output.convert,
        shards=rules.shards.output,
    output:
        latest="results/train/latest",
        metrics="results/train/metrics.jsonl",
    params:
        train=canonical(config["train"]),
        parallel=canonical(config["parallel"]),
        use_te=config["model"]["use_te"],
        data={"max_seq_len": config["data"]["max_seq_len"], "use_audio_in_video": config["data"]["use_audio_in_video"]},
    log:
        "logs/finetune.log",
    benchmark:
        "benchmarks/finetune.tsv"
    threads: max(1, config["train"]["cpu_procs"])
    resources:
        mem_mb=16000,
        gpu=config["train"]["gpus_per_node"],
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/finetune.py"
