# Stage 1: the HF checkpoint (tiny | local | huggingface | modelscope) + MANIFEST.json (size + sha256 per file).


rule download:
    output:
        manifest="results/model/hf/MANIFEST.json",
    params:
        model=canonical(config["model"]),
    log:
        "logs/download.log",
    benchmark:
        "benchmarks/download.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/download.py"
