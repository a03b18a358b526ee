# Stage 4: HF checkpoint -> Megatron-Core torch_dist checkpoint (reshardable to any TP/PP/EP/ETP on load) + parity gate.


rule convert:
    input:
        manifest="results/model/hf/MANIFEST.json",
    output:
        convert="results/model/mcore/convert.json",
        parity="results/model/mcore/parity.json",
    params:
        convert=canonical(config["convert"]),
        use_te=config["model"]["use_te"],
    log:
        "logs/convert.log",
    benchmark:
        "benchmarks/convert.tsv"
    threads: config["convert"]["procs"]
    resources:
        mem_mb=8000,
        gpu=config["train"]["gpus_per_node"] and 1,
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/convert.py"
