# Stage 6: the latest training checkpoint (any layout) -> a complete Qwen3-Omni HF checkpoint (talker + code2wav copied).
# Beside MANIFEST.json (the declared output, written last) the job writes the safetensors shards, their index and the
# HF config/tokenizer/chat template/preprocessor files; all of it goes to results/export/hf.staging first and is
# renamed into place, so a killed job never leaves an export that looks complete.


# With train.lora, export.lora picks the outputs: merged (results/export/hf, as without LoRA), adapter (a PEFT folder in
# results/export/adapter, published atomically like the merged folder) or both.
EXPORT_LORA = config["export"].get("lora", "merged") if config["train"].get("lora", {}).get("enabled") else "merged"
EXPORT_OUTPUTS = {
    **({"manifest": "results/export/hf/MANIFEST.json"} if EXPORT_LORA in ("merged", "both") else {}),
    **({"adapter": "results/export/adapter/adapter_config.json"} if EXPORT_LORA in ("adapter", "both") else {}),
}


rule export:
    input:
        latest=rules.finetune.output.latest,
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
