# One call when the device time left allows only one (~9.5 minutes): ours, the variant with the multimodal forward
# as before its sync removal / RoPE tables / bias fold, and transformers' packed flex_attention (session 14's fastest
# row on both kinds), on batches encoded in the same call; no padded or sdpa row, no GPU tests, no profile.
SECONDS=0
source bench/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/card.txt
python3 bench/train_throughput.py $COMMON --hf-attn flex_attention --variants base,syncs=on+towerrope=mcore+bias=after \
  --budget $((560 - SECONDS)) --json /tmp/o/tt_single.json > $OUT/single.log 2>&1
echo "done at $SECONDS s" | tee -a $OUT/single.log
cp /tmp/o/tt_single.json $OUT/ 2>/dev/null
