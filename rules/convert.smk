# Stage 4: HF checkpoint -> Megatron-Core torch_dist checkpoint (reshardable to any TP/PP/EP/ETP on load) + parity gate.
# Beside convert.json and parity.json (the declared outputs) the job writes results/model/mcore/checkpoint/ and the HF
# config, tokenizer, chat template and preprocessor files; it is all written to results/model/mcore.staging and
# renamed into place, so a killed job never leaves a checkpoint that looks complete.


rule convert:
    input:
        manifest="results/model/hf/MANIFEST.json",
    output:
        convert="results/model/mcore/convert.json",
        parity="results/model/mcore/parity.json",
    params:
        **section_params(convert=config["convert"], parallel=config["parallel"]),
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
