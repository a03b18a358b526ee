# Stage 1: the HF checkpoint (tiny | local | huggingface | modelscope) + MANIFEST.json (size + sha256 per file).
# Two jobs, so that a failure never costs the working model: `fetch_model` builds and verifies the new checkpoint
# in results/model/hf.fetched (Snakemake deletes only that job's own output when it fails); `download` then swaps
# it in with one rename. A failed fetch leaves results/model/hf, its MANIFEST.json and every later stage untouched
# (the `download` job never started, so Snakemake neither deleted its output nor recorded the failed settings).


rule fetch_model:
    output:
        temp(directory("results/model/hf.fetched")),
    params:
        model=canonical(config["model"]),
        out_dir=lambda wildcards, output: Path(output[0]).with_suffix(""),  # results/model/hf
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


rule download:
    input:
        rules.fetch_model.output,
    output:
        manifest="results/model/hf/MANIFEST.json",
    params:
        model=canonical(config["model"]),
    log:
        "logs/download_publish.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/publish_model.py"
