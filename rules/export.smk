# Stage 6: the latest training checkpoint (any layout) -> a complete Qwen3-Omni HF checkpoint (talker + code2wav copied).
# Beside MANIFEST.json (the declared output, written last) the job writes the safetensors shards, their index and the
# HF config/tokenizer/chat template/preprocessor files; all of it goes to results/export/hf.staging first and is
# renamed into place, so a killed job never leaves an export that looks complete.


rule export:
    input:
        latest=rules.finetune.output.latest,
        hf_manifest="results/model/hf/MANIFEST.json",
    output:
        manifest="results/export/hf/MANIFEST.json",
    params:
        **section_params(export=config["export"]),
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
