"""Rule `evaluate_model`: one evaluation (wildcard model = base | tuned) through omni_model.eval.run: scores under
torchrun at the configured layout, greedy answers with transformers, results/eval/{model}.json + _samples.jsonl."""

from pathlib import Path

from omni_model.runtime.logs import console_line, stage_logging


def main(smk) -> None:
    name = smk.wildcards.model
    with stage_logging(smk.log[0], f"evaluate_{name}") as log:  # first: the imports below print warnings (to the log)
        from omni_model.eval.run import LAUNCH_KEYS, Evaluation, evaluate_model
        from omni_model.train.checkpointing import read_latest

        # the inputs are markers beside their folders (rules/evaluate.smk), but for the download's manifest
        mcore_dir = Path(smk.input.convert).with_suffix("")
        if name == "base":
            checkpoint, hf_dir = mcore_dir / "checkpoint", Path(smk.input.hf_manifest).parent
        else:
            checkpoint = read_latest(Path(smk.input.weights).with_suffix(""))
            hf_dir = Path(smk.input.hf_export).with_suffix("")
        params, settings = smk.params, smk.params.eval
        evaluation = Evaluation(
            name=name, checkpoint=str(checkpoint), mcore_dir=str(mcore_dir), hf_dir=str(hf_dir),
            shards=str(Path(smk.input.shards).with_suffix("")), processed=str(smk.input.processed),
            parallel=dict(params.parallel),
            launch={key: smk.config["train"][key] for key in LAUNCH_KEYS}, data=dict(params.data),
            use_te=bool(params.use_te), generate_samples=settings["generate_samples"],
            max_new_tokens=settings["max_new_tokens"], metric=settings["metric"],
            speech_samples=settings["speech_samples"], speaker=smk.config["train_talker"]["speaker"])
        eval_data = Path(smk.input.eval_data) if "eval_data" in smk.input.keys() else None
        summary = evaluate_model(evaluation, smk.output.summary, smk.output.samples, eval_data, log=log.info)
        scores, text = summary["scores"]["all"], summary["text"]
        console_line(f"[evaluate] {name}: {scores['samples']} samples, loss {scores['loss']:.4f}, next-token accuracy "
                     f"{scores['accuracy']:.3f}; {text['samples']} answers, exact match {text['exact_match']} "
                     f"(results: {smk.output.summary}, log: {smk.log[0]})")


# dist_checkpointing may start a `spawn` helper process that re-imports the main script: run only as the script
if __name__ == "__main__":
    main(snakemake)  # noqa: F821
