# Stage 6: the latest training checkpoint (any layout) -> a complete Qwen3-Omni HF checkpoint (talker + code2wav copied).
# results/export/hf/ holds the safetensors shards, their index, the HF config/tokenizer/chat template/preprocessor
# files and MANIFEST.json (written last); all of it goes to results/export/hf.staging first and is renamed into place,
# then the marker `hf.done` beside it, the declared output (as `shards`'s, rules/data.smk): a failed or killed rerun
# leaves the previous export complete. Consumers read the folder at the marker's path without `.done`.


rule export:
    input:
        train=rules.finetune.output.done,
        hf_manifest="results/model/hf/MANIFEST.json",
    output:
        done="results/export/hf.done",
    params:
        export=canonical(config["export"]),
        use_te=config["model"]["use_te"],
    log:
        "logs/export.log",
    benchmark:
        "benchmarks/export.tsv"
    threads: 1
    resources:
        # peak ~3x the largest load unit over the baseline (measured): the 30B-A3B audio tower is 2.6 GB in fp32
        mem_mb=16000,
        gpu=0,
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/export.py"
