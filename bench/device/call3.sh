# call 3 (same warm machine): text at transformers micro-batch 1: the precision row (fp32 masters + moments) and
# ours' gathered MoE slot sums against mcore's combine
SECONDS=0
source bench/device/setup.sh
python3 bench/train_throughput.py --shards $R/.devcarry/shards --work /tmp/ttwork3 --data-workers 8 --kinds text \
  --hf-micro-batch 1 --hf-attn flex_attention+fp32 --variants base,combine=mcore --budget $((560 - SECONDS)) \
  --json /tmp/o/tt_call3.json > $OUT/call3.log 2>&1
echo "done at $SECONDS s" | tee -a $OUT/call3.log
cp /tmp/o/tt_call3.json $OUT/ 2>/dev/null
