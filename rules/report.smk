# Report items: `snakemake --report report.html` shows them with captions (plus Snakemake's rule graph + runtimes).
# One rule per stage group reads that group's contract outputs and benchmarks and writes PNG/HTML items; each is
# part of `all`, so the report is complete whenever the pipeline is. `snakemake --report` takes the items on disk
# whatever their age: after a stage ran on its own (e.g. `snakemake shards`), items_current (common.smk) stops it
# instead of showing the previous data.


rule report_data:
    input:
        current=items_current("report_data"),
        dj_report=rules.datajuicer.output.report,
        shards=rules.shards.output.done,
    output:
        summary=report("results/report/data_summary.png", caption="../workflow/report/data_summary.rst",
                       category="Data", labels={"item": "kept and dropped"}),
        table=report("results/report/data_summary.html", caption="../workflow/report/data_table.rst",
                     category="Data", labels={"item": "counts by stage and op"}),
        drops=report("results/report/drops.html", caption="../workflow/report/drops.rst",
                     category="Data", labels={"item": "drop list"}),
        tokens=report("results/report/token_lengths.png", caption="../workflow/report/token_lengths.rst",
                      category="Data", labels={"item": "token lengths"}),
        benchmarks=report("results/report/benchmarks_data.html", caption="../workflow/report/benchmarks.rst",
                          category="Benchmarks", labels={"item": "data stages"}),
    params:
        stages=["download", "demo_data", "datajuicer", "shards"],
    log:
        "logs/report_data.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/report_data.py"


rule report_convert:
    input:
        current=items_current("report_convert"),
        convert=rules.convert.output.done,
    output:
        parity=report("results/report/parity.html", caption="../workflow/report/parity.rst",
                      category="Model", labels={"item": "conversion parity"}),
        benchmarks=report("results/report/benchmarks_convert.html", caption="../workflow/report/benchmarks.rst",
                          category="Benchmarks", labels={"item": "convert"}),
    params:
        stages=["convert"],
    log:
        "logs/report_convert.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/report_convert.py"


rule report_finetune:
    input:
        current=items_current("report_finetune"),
        train=rules.finetune.output.done,
    output:
        curves=report("results/report/train_curves.png", caption="../workflow/report/train_curves.rst",
                      category="Training", labels={"item": "curves"}),
        benchmarks=report("results/report/benchmarks_finetune.html", caption="../workflow/report/benchmarks.rst",
                          category="Benchmarks", labels={"item": "finetune"}),
    params:
        stages=["finetune"],
    log:
        "logs/report_finetune.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    script:
        "../workflow/scripts/report_finetune.py"
