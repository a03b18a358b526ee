# call 2 (same warm machine): the headline run on call 1's batches: ours, transformers flex / padded / sdpa / +fp32, each row profiled (one more step, not timed)
SECONDS=0
source bench/device/setup.sh
python3 bench/train_throughput.py $COMMON --hf-attn flex_attention,padded,sdpa,flex_attention+fp32 --variants base --profile \
  --budget $((545 - SECONDS)) --json /tmp/o/train_throughput.json > $OUT/call2.log 2>&1
echo "done at $SECONDS s" | tee -a $OUT/call2.log
cp /tmp/o/train_throughput.json $OUT/ 2>/dev/null
cp /tmp/o/profile_*.txt $OUT/ 2>/dev/null
