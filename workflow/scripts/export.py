"""Rule `export`: the checkpoint `results/train/latest` names (written at any layout) + results/model/hf ->
results/export/hf, a complete Qwen3-Omni: thinker tensors from the checkpoint in the source dtypes, talker and
code2wav copied unchanged, sharded safetensors + index + config/tokenizer/preprocessor files, MANIFEST.json last,
all in a staging folder moved into place when complete; then the rule's declared outputs, the markers beside the
folders (`hf.done`, `adapter.done`: a failed run never touches the previous export, rules/export.smk).
A LoRA checkpoint (train.lora) is exported by export.lora: merged into results/export/hf and/or a PEFT folder in
results/export/adapter. One process: dist_checkpointing reshards the checkpoint to it, one group of tensors at a
time."""

from pathlib import Path

from omni_model.runtime.logs import stage_logging
from omni_model.runtime.publish import write_marker


def main(smk) -> None:
    with stage_logging(smk.log[0], "export") as log:  # first: the imports below print warnings (to the log)
        from omni_model.convert.export import export_lora, export_to_hf
        from omni_model.download import require_intact
        from omni_model.runtime.parallel import destroy_parallel
        from omni_model.train.checkpointing import lora_record, read_latest

        hf_dir = Path(smk.input.hf_manifest).parent
        require_intact(hf_dir)
        checkpoint = read_latest(Path(smk.input.train).with_suffix(""))  # the inputs and outputs are markers beside
        talker_dir = Path(smk.input.talker).with_suffix("")  # `latest` only when finetune_talker trained the talker
        talker = read_latest(talker_dir) if (talker_dir / "latest").exists() else None
        markers = {name: Path(getattr(smk.output, name)) for name in ("done", "adapter")  # their folders
                   if getattr(smk.output, name, None)}
        folders = {name: marker.with_suffix("") for name, marker in markers.items()}
        try:
            if lora_record(checkpoint) is not None or "adapter" in markers:
                summary = export_lora(checkpoint, hf_dir, mode=smk.params.export["lora"],
                                      merged_dir=folders.get("done"), adapter_dir=folders.get("adapter"),
                                      shard_size=int(smk.params.export["shard_size"]), use_te=bool(smk.params.use_te),
                                      log=log.info)
                log.info("LoRA export of %s: %s", checkpoint, summary)
            else:
                log.info("exporting %s against %s -> %s", checkpoint, hf_dir, folders["done"])
                summary = export_to_hf(checkpoint, hf_dir, folders["done"],
                                       shard_size=int(smk.params.export["shard_size"]),
                                       use_te=bool(smk.params.use_te), log=log.info, talker_checkpoint=talker)
                log.info("%d thinker tensors from %s, %d talker tensors from %s, %d tensors copied, %d shard(s), "
                         "%.1f MB", summary["thinker_tensors"], checkpoint, summary["talker_tensors"],
                         talker or "(none: the source talker is copied)", summary["copied_tensors"],
                         summary["shards"], summary["total_size"] / 1e6)
        finally:
            destroy_parallel()
        for marker in markers.values():  # last
            write_marker(marker, f"exported {checkpoint}")


# dist_checkpointing may start a `spawn` helper process that re-imports the main script: run only as the script
if __name__ == "__main__":
    main(snakemake)  # noqa: F821
