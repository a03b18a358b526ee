# Stage 7: base (the converted checkpoint) vs tuned (the training's `latest`) on the val split: per-sample loss and
# next-token accuracy by the mcore thinker at the configured layout (torchrun, like finetune), greedy answers by
# transformers on the HF checkpoint of the same weights (base: the download, tuned: the export). One job per model
# (wildcard), so a changed train.* setting reruns only `evaluate_model` of tuned (through finetune -> export); base
# depends on nothing of training. Where the ranks run (train.gpus_per_node or cpu_procs, on one node) is read from
# the config in the job, not a param: it does not change a number.


EVAL_DATA = config["eval"].get("data")
# the encoder settings the shards were written with (scoring, prompts and eval.data encode the same way)
ENCODER_DATA = {key: config["data"][key] for key in ("max_seq_len", "use_audio_in_video", "video_fps",
                "video_max_frames", "video_min_pixels", "video_max_pixels")}
# the stages' outputs are markers beside their folders (rules/data.smk): the scripts read the folder at the marker's
# path without `.done`. Tuned answers are generated from the merged export (export.lora merged or both with LoRA).
EVALUATED_WEIGHTS = {
    "base": {"weights": rules.convert.output.done, "hf_manifest": "results/model/hf/MANIFEST.json"},
    "tuned": {"weights": rules.finetune.output.done, "hf_export": "results/export/hf.done"},
}


EVAL_DATA_INPUT = {"eval_data": "results/eval/data"} if EVAL_DATA else {}

if EVAL_DATA:

    # eval.data: validated and encoded like the training data (not filtered or deduplicated by the recipe); its
    # overlap with the training split is counted
    rule eval_data:
        input:
            raw=EVAL_DATA,
            manifest="results/model/hf/MANIFEST.json",
            processed=rules.datajuicer.output.processed,
            shards=rules.shards.output.done,
        output:
            directory("results/eval/data"),
        params:
            format=config["data"]["format"],
            data=ENCODER_DATA,
        log:
            "logs/eval_data.log",
        benchmark:
            "benchmarks/eval_data.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            gpu=0,
        conda:
            "../envs/pipeline.yaml"
        script:
            "../workflow/scripts/eval_data.py"


rule evaluate_model:
    input:
        unpack(evaluated_inputs),
        convert=rules.convert.output.done,
        shards=rules.shards.output.done,
        processed=rules.datajuicer.output.processed,
    output:
        summary="results/eval/{model}.json",
        samples="results/eval/{model}_samples.jsonl",
    wildcard_constraints:
        model="base|tuned",
    params:
        **section_params(eval=config["eval"], parallel=config["parallel"]),
        use_te=config["model"]["use_te"],
        data=ENCODER_DATA,
    log:
        "logs/evaluate_{model}.log",
    benchmark:
        "benchmarks/evaluate_{model}.tsv"
    threads: max(1, config["train"]["cpu_procs"])
    resources:
        mem_mb=16000,
        gpu=config["train"]["gpus_per_node"],
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/evaluate.py"


# The report's "Evaluation" items (here, beside the stage, rather than in report.smk)
rule report_evaluate:
    input:
        current=items_current("report_evaluate"),
        base=expand(rules.evaluate_model.output.summary, model="base"),
        tuned=expand(rules.evaluate_model.output.summary, model="tuned"),
        base_samples=expand(rules.evaluate_model.output.samples, model="base"),
        tuned_samples=expand(rules.evaluate_model.output.samples, model="tuned"),
    output:
        table=report("results/report/eval_table.html", caption="../workflow/report/eval_table.rst",
                     category="Evaluation", labels={"item": "base vs tuned"}),
        modality=report("results/report/eval_modality.png", caption="../workflow/report/eval_modality.rst",
                        category="Evaluation", labels={"item": "per modality"}),
        samples=report("results/report/eval_samples.html", caption="../workflow/report/eval_samples.rst",
                       category="Evaluation", labels={"item": "answers"}),
        benchmarks=report("results/report/benchmarks_evaluate.html", caption="../workflow/report/benchmarks.rst",
                          category="Benchmarks", labels={"item": "evaluate"}),
    params:
        stages=["evaluate_base", "evaluate_tuned"],
    log:
        "logs/report_evaluate.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/report_evaluate.py"


# `snakemake evaluate`: both evaluations and their report items, so that a report made after it (`snakemake --report
# report.html`, or with the target `evaluate`) holds the Evaluation section of these numbers
rule evaluate:
    input:
        expand(rules.evaluate_model.output.summary, model=["base", "tuned"]),
        rules.report_evaluate.output,
    localrule: True
