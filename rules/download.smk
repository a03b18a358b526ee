# Stage 1: the HF checkpoint (tiny | local | huggingface | modelscope) + MANIFEST.json (size + sha256 per file).
# Two jobs, so that a failure never costs the working model: `fetch_model` builds and verifies the new checkpoint
# in results/model/hf.fetched (Snakemake deletes only that job's own output when it fails); `download` then swaps
# it in with one rename. A failed fetch leaves results/model/hf, its MANIFEST.json and every later stage untouched
# (the `download` job never started, so Snakemake neither deleted its output nor recorded the failed settings).

from omni_model.data.speech import codec_source

CODEC_MANIFEST = "results/model/codec/MANIFEST.json"


rule fetch_model:
    output:
        temp(directory("results/model/hf.fetched")),
    # No params on purpose: Snakemake records a failed job's params, and a mismatch would rerun this job (and the
    # publish + every later stage) even though results/model/hf is unchanged. The model config is a param of
    # `download` below, which reruns (and so needs this job) whenever it changes; the script reads config["model"].
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
    params:  # model.codec is the codec rule's: changing it refetches the codec, not the model
        **section_params(model={key: value for key, value in config["model"].items() if key != "codec"}),
    log:
        "logs/download_publish.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/publish_model.py"


# The speech codec (model.codec): encodes spoken answers into the talker's codes in the shards stage. Planned only
# when model.codec names one (auto: the tiny random Mimi for the tiny / random sources). Checked against the
# checkpoint's talker and code2wav before it is published beside it.
rule codec:
    input:
        manifest=rules.download.output.manifest,
    output:
        manifest=CODEC_MANIFEST,
    params:
        **section_params(codec=codec_source(config["model"]) or {}),
    log:
        "logs/codec.log",
    benchmark:
        "benchmarks/codec.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/codec.py"
