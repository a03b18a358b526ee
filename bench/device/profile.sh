# After headline.sh on the same warm machine: one profiled step (tables by op, with Python callers) of ours and of
# the fastest transformers rows on the batches headline.sh encoded (3 timed steps each: the profile, not the timing,
# is what this call is for), then the GPU tests and the host cost of a GEMM launch (bench/host_gemm.py).
# LEFT: the call's seconds (default 560; less when the session's device time is short).
SECONDS=0
LEFT=${LEFT:-560}
source bench/device/setup.sh
python3 bench/train_throughput.py $COMMON --hf-attn flex_attention,padded --variants ${VARIANTS:-base} \
  --steps 3 --repeats 1 --profile --profile-stacks 4 --budget $((LEFT - 150 - SECONDS)) --json /tmp/o/tt_profile.json \
  > $OUT/profile.log 2>&1
echo "profiles done at $SECONDS s" | tee -a $OUT/profile.log
cp /tmp/o/tt_profile.json /tmp/o/profile_*.txt $OUT/ 2>/dev/null
timeout $((LEFT - 40 - SECONDS)) python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_host_syncs.py \
  tests/test_first_write_grads.py > $OUT/gpu_tests.txt 2>&1
echo "tests done at $SECONDS s" | tee -a $OUT/profile.log
timeout $((LEFT - 5 - SECONDS)) python3 bench/host_gemm.py --json $OUT/host_gemm.json > $OUT/host_gemm.txt 2>&1
echo "done at $SECONDS s" | tee -a $OUT/profile.log
