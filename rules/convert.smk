# Stage 4: HF checkpoint -> Megatron-Core torch_dist checkpoint (reshardable to any TP/PP/EP/ETP on load) + parity gate.
# results/model/mcore/ holds checkpoint/, convert.json, parity.json and the HF config, tokenizer, chat template and
# preprocessor files. The conversion and the parity gate write into a staging folder, renamed into place only when
# both succeeded, then the marker `mcore.done` beside it, the declared output (as `shards`'s, rules/data.smk): a
# failed or killed rerun leaves the previous folder complete. Consumers read the folder at the marker's path without
# `.done`.


rule convert:
    input:
        manifest="results/model/hf/MANIFEST.json",
    output:
        done="results/model/mcore.done",
    # Only the layout keys convert writes at (workflow/scripts/convert.py): a change of parallel.cp (or of anything
    # else convert ignores) must not rerun a 60 GB conversion.
    params:
        **section_params(convert=config["convert"], parallel={key: config["parallel"].get(key)
                                                             for key in ("tp", "pp", "ep", "etp", "first_stage_layers")}),
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
