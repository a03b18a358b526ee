# After headline.sh on the same warm machine: the GPU tests, the host cost of a GEMM launch (bench/host_gemm.py),
# and one profiled step (tables by op, with Python callers) of ours and of the fastest transformers rows, on the
# batches headline.sh encoded (3 timed steps each: the profile, not the timing, is what this call is for).
SECONDS=0
source bench/device/setup.sh
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_host_syncs.py tests/test_first_write_grads.py \
  > $OUT/gpu_tests.txt 2>&1
echo "tests done at $SECONDS s" | tee -a $OUT/profile.log
timeout 90 python3 bench/host_gemm.py --json $OUT/host_gemm.json > $OUT/host_gemm.txt 2>&1
echo "host gemm done at $SECONDS s" | tee -a $OUT/profile.log
python3 bench/train_throughput.py $COMMON --hf-attn flex_attention,padded --variants ${VARIANTS:-base,visual=apart+towers=per-micro-batch} \
  --steps 3 --repeats 1 --profile --profile-stacks 4 --budget $((560 - SECONDS)) --json /tmp/o/tt_profile.json \
  >> $OUT/profile.log 2>&1
echo "done at $SECONDS s" | tee -a $OUT/profile.log
cp /tmp/o/tt_profile.json /tmp/o/profile_*.txt $OUT/ 2>/dev/null
