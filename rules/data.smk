# Stages 2-3: raw chat jsonl (or the generated demo set) -> Data-Juicer -> WebDataset shards + Energon metadata.
# Every input sample ends up either in the shards or in results/data/shards/drops.jsonl with its stage and reason.
# Consumers take `rules.shards.output.done` (a marker beside the folder) and read the folder at its path without
# `.done`.

from omni_model.data.media import MEDIA_FORMAT, VIDEO_SETTINGS

DATA = config["data"]
RAW = "results/data/raw/demo.jsonl" if DATA["raw"] == "demo" else DATA["raw"]


rule demo_data:
    output:
        jsonl="results/data/raw/demo.jsonl",
        media=directory("results/data/raw/media"),
    params:
        **data_params("demo_samples", "seed"),
    log:
        "logs/demo_data.log",
    benchmark:
        "benchmarks/demo_data.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        gpu=0,
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/demo_data.py"


rule datajuicer:
    input:
        raw=RAW,
        recipe=DATA["recipe"],
    output:
        processed="results/data/processed.jsonl",
        drops="results/data/drops.jsonl",
        report="results/data/datajuicer_report.json",
    params:
        **data_params("format", "executor", "ray_address"),
    log:
        "logs/datajuicer.log",
    benchmark:
        "benchmarks/datajuicer.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/datajuicer.py"


rule shards:
    input:
        processed=rules.datajuicer.output.processed,
        drops=rules.datajuicer.output.drops,
        report=rules.datajuicer.output.report,
        manifest="results/model/hf/MANIFEST.json",
        # the speech codec for spoken answers (rule codec; none when model.codec resolves to none)
        codec=[CODEC_MANIFEST] if codec_source(config["model"]) else [],
    # The declared output is a marker beside the folder, not `directory(...)`: Snakemake deletes a job's declared
    # outputs before the job runs, and a failed rerun (e.g. a data set whose every row is bad) must leave the previous
    # shards in place. The job writes the folder into a staging folder and swaps it in on success, then the marker.
    # A failure costs only the marker, so the next plan reruns the job (and every job after it), whatever the
    # settings. Not `update(...)`: Snakemake puts an update() output back after a failure but records the failed
    # job's params for it, so the same failing settings would then plan nothing ("Nothing to be done") over the
    # previous output. Beside, not inside: the marker's times are not part of the shards' fingerprint (the training
    # settings digest). convert, finetune and export declare their markers the same way.
    output:
        done="results/data/shards.done",
    params:
        **data_params("shard_max_samples", "shard_max_bytes", "val_fraction", "seed", "max_seq_len", "executor",
                      "ray_address", "use_audio_in_video", *VIDEO_SETTINGS),
        # what the shards store: a new canonical-media format in the package makes them stale (training refuses
        # shards of another format; without this param Snakemake would keep them and finetune would fail)
        media_format=f"shards media format = {MEDIA_FORMAT!r}",
    log:
        "logs/shards.log",
    benchmark:
        "benchmarks/shards.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/shards.py"
