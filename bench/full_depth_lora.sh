#!/usr/bin/env bash
# The released Qwen3-Omni-30B-A3B (48 layers, real towers, random weights) through
# download -> convert -> finetune (LoRA, packing, seq 4096) -> export (PEFT adapter) on ONE GPU machine with 64 GiB of
# disk and 128 GiB of host memory, then transformers + peft load the export and generate (bench/full_depth_generate.py).
#
# Where each copy lives (the storage plan a user with the same machine should copy):
#   HF checkpoint  70.5 GB bf16 (thinker 63.4, talker 3.3, towers 1.2, code2wav 0.1) -> host shared memory (/dev/shm):
#                  it does not fit the disk beside the converted one; convert streams it tensor by tensor.
#   converted      63.4 GB (the thinker, torch_dist)                              -> disk (results/model/mcore)
#   training       adapters + their fp32 masters + Adam moments: ~4.5 GB a checkpoint (rank 8 on every expert of 48
#                  layers is 0.32 B parameters), two kept                         -> host shared memory (results/train)
#   export         export.lora: adapter (a PEFT folder, ~0.6 GB; the merged 70 GB model would not fit the disk)
#                                                                                  -> host shared memory (results/export)
#                  (the disk keeps ~2 GiB beside the converted base: the first full-depth finetune filled it at its
#                  first save, session 12)
# results/model is linked into /dev/shm for the download stage only; afterwards results/model is a disk folder whose
# `hf` entry links to the shared-memory copy, so convert writes its 63 GB to disk.
#
# Data: Data-Juicer is not on the GPU machine, so its three outputs (results/data/{processed,drops}.jsonl and
# datajuicer_report.json, made with this config elsewhere) are carried; the demo media are regenerated here (seeded)
# and the media paths of processed.jsonl are re-rooted to this checkout. Made on a machine with Data-Juicer by:
#   snakemake results/data/processed.jsonl --cores 2 --configfile config/qwen3-omni-30b-a3b-lora-1gpu-80g.yaml \
#     --config model='{source: random}' data='{raw: demo}'
# and carried with the run (carry: results/data/processed.jsonl, results/data/drops.jsonl,
# results/data/datajuicer_report.json; the 80g and 141g configs have the same data section).
# Idempotent: each stage is a Snakemake target, a rerun skips what is done (a lent machine allows 10 minutes a call:
# start it in the background and poll, see bench/RESULTS.md).
#
#   bash bench/full_depth_lora.sh <out-dir>          (GPU machine; results/data's three Data-Juicer outputs present)
#   OMNI_FD_GPU_WAIT=/tmp/gpu-free bash bench/full_depth_lora.sh <out-dir>   (convert waits for that file)
set -euo pipefail
out=${1:?usage: full_depth_lora.sh OUT_DIR}
mkdir -p "$out"
shm=${OMNI_HF_SHM:-/dev/shm/omni-model}
gib() { df -BG --output=avail "$1" | tail -1 | tr -dc 0-9; }
gpu_gib=$(python3 -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))")
if [ "$gpu_gib" -ge 120 ]; then config=config/qwen3-omni-30b-a3b-lora-1gpu-141g.yaml; else config=config/qwen3-omni-30b-a3b-lora-1gpu-80g.yaml; fi
if [ "$(gib /dev/shm)" -lt 74 ]; then mount -o remount,size=100G /dev/shm; fi
echo "gpu ${gpu_gib} GiB, config $config, /dev/shm free $(gib /dev/shm) GiB, disk free $(gib .) GiB" | tee -a "$out/storage.txt"

overrides=(model='{source: random}' data='{raw: demo}' convert='{parity_layers: 4}' export='{lora: adapter}'
           train='{iters: 6, lr_warmup_iters: 2, save_interval: 3, eval_interval: 0, global_batch_size: 8}')
smk() { python3 -m snakemake "$1" --cores all --scheduler greedy --rerun-triggers mtime --configfile "$config" --config "${overrides[@]}"; }
stage() {  # stage NAME TARGET: time one target, keep its log (a rerun skips the stages that finished)
  if [ -e "$out/$1.done" ]; then return; fi
  carried_data_outputs
  local started=$SECONDS
  smk "$2" > "$out/$1.log" 2>&1 || { tail -60 "$out/$1.log"; echo "$1 FAILED" | tee -a "$out/stages.txt"; exit 1; }
  echo "$1 $((SECONDS - started)) s" | tee -a "$out/stages.txt"
  touch "$out/$1.done"
}

carried_data_outputs() {
  # The Data-Juicer outputs ran elsewhere and are carried: re-root their media paths to this checkout and make their
  # inputs older than them, keeping their own mtimes (a changed mtime would make shards and finetune stale on a
  # rerun). Done before every stage: a lent machine's later call carries the files again, as they were (session 13's
  # export, in the call after finetune's, found processed.jsonl older than the demo set and planned Data-Juicer).
  [ -e results/data/raw/demo.jsonl ] || return 0
  local mtime; mtime=$(stat -c %Y results/data/processed.jsonl)
  sed -i "s#\"/[^\"]*/results/data/raw/media/#\"$PWD/results/data/raw/media/#g" results/data/processed.jsonl
  touch -d "@$mtime" results/data/processed.jsonl
  touch -d "@$((mtime - 3600))" results/data/raw/demo.jsonl results/data/raw/media config/*.yaml
}
[ -e results/data/raw/demo.jsonl ] || stage demo_data results/data/raw/demo.jsonl

if [ ! -e results/model/hf/MANIFEST.json ]; then
  mkdir -p "$shm/model" results
  rm -rf results/model && ln -s "$shm/model" results/model
  stage download download
  rm results/model && mkdir results/model && ln -s "$shm/model/hf" results/model/hf
  echo "after download: /dev/shm free $(gib /dev/shm) GiB, disk free $(gib .) GiB" | tee -a "$out/storage.txt"
fi
# OMNI_FD_GPU_WAIT=FILE: wait for FILE before the first stage that uses the GPU (convert's parity gate), so that a GPU
# benchmark can run beside the download (CPU and shared memory only) without sharing the card
if [ -n "${OMNI_FD_GPU_WAIT:-}" ]; then while [ ! -e "$OMNI_FD_GPU_WAIT" ]; do sleep 5; done; fi
stage convert convert
du -sh results/model/mcore | tee -a "$out/storage.txt"
du -sh /dev/shm/* 2>/dev/null | sort -h | tail -4 | tee -a "$out/storage.txt"  # what else holds shared memory
stage shards shards
for d in train export; do  # into shared memory (the storage plan above); a rerun keeps the links
  if [ ! -L results/$d ]; then mkdir -p "$shm/$d"; rm -rf "results/$d"; ln -s "$shm/$d" "results/$d"; fi
done
stage finetune finetune
stage export export
du -shL results/train results/export/adapter | tee -a "$out/storage.txt"
cp benchmarks/*.tsv results/train/metrics.jsonl "$out/" 2>/dev/null || true
cp results/model/mcore/convert.json results/model/mcore/parity.json "$out/" 2>/dev/null || true
started=$SECONDS
python3 bench/full_depth_generate.py results/model/hf results/export/adapter --out "$out/generate.json" \
  > "$out/generate.log" 2>&1 || tail -30 "$out/generate.log"
echo "generate $((SECONDS - started)) s" | tee -a "$out/stages.txt"
echo DONE | tee -a "$out/stages.txt"
