"""Rule `export`: the checkpoint `results/train/latest` names (written at any layout) + results/model/hf ->
results/export/hf, a complete Qwen3-Omni: thinker tensors from the checkpoint in the source dtypes, talker and
code2wav copied unchanged, sharded safetensors + index + config/tokenizer/preprocessor files, MANIFEST.json last,
all in a staging folder moved into place when complete; then the rule's declared output, the marker `hf.done` beside
it (a failed run never touches the previous export: rules/export.smk).
One process: dist_checkpointing reshards the checkpoint to it, one group of tensors at a time."""

from pathlib import Path

from omni_model.runtime.logs import stage_logging


def main(smk) -> None:
    with stage_logging(smk.log[0], "export") as log:  # first: the imports below print warnings (to the log)
        from omni_model.convert.export import export_to_hf
        from omni_model.download import require_intact
        from omni_model.runtime.parallel import destroy_parallel
        from omni_model.train.checkpointing import read_latest

        hf_dir = Path(smk.input.hf_manifest).parent
        require_intact(hf_dir)
        checkpoint = read_latest(Path(smk.input.train).with_suffix(""))  # the inputs and output are markers beside
        marker = Path(smk.output.done)                                    # their folders
        out_dir = marker.with_suffix("")
        log.info("exporting %s against %s -> %s", checkpoint, hf_dir, out_dir)
        try:
            summary = export_to_hf(checkpoint, hf_dir, out_dir, shard_size=int(smk.params.export["shard_size"]),
                                   use_te=bool(smk.params.use_te), log=log.info)
        finally:
            destroy_parallel()
        log.info("%d thinker tensors from %s, %d talker/code2wav tensors copied, %d shard(s), %.1f MB",
                 summary["thinker_tensors"], checkpoint, summary["copied_tensors"], summary["shards"],
                 summary["total_size"] / 1e6)
        marker.write_text(f"exported {checkpoint}: {summary['thinker_tensors']} thinker tensors\n")  # last


# dist_checkpointing may start a `spawn` helper process that re-imports the main script: run only as the script
if __name__ == "__main__":
    main(snakemake)  # noqa: F821
