# Stage 6: the latest training checkpoint (any layout) -> a complete Qwen3-Omni HF checkpoint: the talker from the
# finetune_talker run's `latest` when it trained one (else copied, like code2wav).
# results/export/hf/ holds the safetensors shards, their index, the HF config/tokenizer/chat template/preprocessor
# files and MANIFEST.json (written last); all of it goes to results/export/hf.staging first and is renamed into place,
# then the marker `hf.done` beside it, the declared output (as `shards`'s, rules/data.smk): a failed or killed rerun
# leaves the previous export complete. Consumers read the folder at the marker's path without `.done`.


# With train.lora, export.lora picks the outputs: merged (results/export/hf, as without LoRA), adapter (a PEFT folder in
# results/export/adapter, staged and published like the merged folder, with its marker adapter.done) or both.
EXPORT_LORA = config["export"].get("lora", "merged") if config["train"].get("lora", {}).get("enabled") else "merged"
EXPORT_OUTPUTS = {
    **({"done": "results/export/hf.done"} if EXPORT_LORA in ("merged", "both") else {}),
    **({"adapter": "results/export/adapter.done"} if EXPORT_LORA in ("adapter", "both") else {}),
}


rule export:
    input:
        train=rules.finetune.output.done,
        talker=rules.finetune_talker.output.done,
        hf_manifest="results/model/hf/MANIFEST.json",
    output:
        **EXPORT_OUTPUTS,
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
