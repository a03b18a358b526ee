# call 1 (fresh machine): GPU tests, every batch of the headline run encoded, ours' variants on both kinds
SECONDS=0
source bench/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/o/card.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_host_syncs.py tests/test_first_write_grads.py \
  > /tmp/o/gpu_tests.txt 2>&1
cp /tmp/o/gpu_tests.txt $OUT/
echo "tests done at $SECONDS s" | tee -a $OUT/call1.log
timeout 90 python3 bench/host_gemm.py --json /tmp/o/host_gemm.json > $OUT/host_gemm.txt 2>&1
echo "host gemm done at $SECONDS s" | tee -a $OUT/call1.log
python3 bench/train_throughput.py $COMMON --hf-attn flex_attention,sdpa,padded --profile --encode-only >> $OUT/call1.log 2>&1
echo "encoded at $SECONDS s" | tee -a $OUT/call1.log
python3 bench/train_throughput.py $COMMON --hf-attn '' --variants base,visual=apart \
  --profile --profile-stacks 4 --budget $((500 - SECONDS)) --json /tmp/o/tt_call1.json >> $OUT/call1.log 2>&1
echo "rows at $SECONDS s" | tee -a $OUT/call1.log
cp /tmp/o/tt_call1.json $OUT/ 2>/dev/null
tar czf $OUT/call1_files.tgz -C /tmp/o .
