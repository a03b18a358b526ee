# The headline in ONE call (~9.5 minutes), for a session whose device time allows few calls: every batch encoded
# (with the profiled step's, so profile.sh on the still-warm machine loads them), then ours against every
# transformers row (packed flex_attention, length-grouped padded, packed sdpa, the +fp32 precision row), each row
# twice; ours' same-run baseline variants last (session 17's two changes first: the fused kernels off, then the tower
# look-ahead off; the budget drops what does not fit, listed in the json). Before all of it, the fused kernels' GPU
# tests (fused_gpu_tests.txt): if they fail, the kernels-off row is ours' figure. The +fp32
# precision row is left out by default: at micro-batch 2 it runs out of memory on an 80 GB card (sessions 14-16), and
# its 45 s crowd out ours' baselines (session 16); call3.sh runs it at transformers' micro-batch 1.
SECONDS=0
KERNELS_OFF=norm=torch+swiglu=torch+ropekernel=torch+llmrope=mcore  # session 17's kernels and LLM RoPE tables off
LEFT=${LEFT:-570}  # the call's seconds: less when the session's device time is short
source bench/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/card.txt
# the fused Triton kernels against their references on this GPU first (~1 minute): the rows below run them
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_kernels.py > $OUT/fused_gpu_tests.txt 2>&1
echo "kernel tests done at $SECONDS s: $(tail -1 $OUT/fused_gpu_tests.txt)" | tee $OUT/headline.log
python3 bench/train_throughput.py $COMMON --hf-attn flex_attention,sdpa,padded --profile --encode-only \
  >> $OUT/headline.log 2>&1
echo "encoded at $SECONDS s" | tee -a $OUT/headline.log
python3 bench/train_throughput.py $COMMON --hf-attn ${HF_ROWS:-flex_attention,padded,sdpa} \
  --variants ${VARIANTS:-base,$KERNELS_OFF,lookahead=off,towers=per-micro-batch} --budget $((LEFT - 10 - SECONDS)) --json /tmp/o/train_throughput.json \
  >> $OUT/headline.log 2>&1
echo "done at $SECONDS s" | tee -a $OUT/headline.log
cp /tmp/o/train_throughput.json $OUT/ 2>/dev/null
