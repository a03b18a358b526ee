# `snakemake plan`: the memory planner's estimate for the configured run (omni_model.plan): per-GPU weights, grads,
# optimizer states, activations, towers, logits. A layout above train.gpu_memory_gib fails this rule with the layouts
# that fit on the same GPUs (the finetune rule runs the same check before launching). Needs no download: a hub model's
# config comes from results/model/hf/ when present, else the released 30B-A3B values for its repository id.


rule plan:
    output:
        table="results/plan.txt",
        json="results/plan.json",
    params:
        **section_params(model=config["model"], train=config["train"], parallel=config["parallel"]),
    log:
        "logs/plan.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/plan.py"
