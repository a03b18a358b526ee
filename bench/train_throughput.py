"""Whole training steps on one GPU: ours (omni_model.train) against transformers' Qwen3-Omni thinker, same batches.

    python bench/train_throughput.py --shards results/data/shards                   # GPU: 30B-A3B layer shapes
    python bench/train_throughput.py --shards results/data/shards --tiny --cpu      # CPU smoke run (tiny, fp32)

On a lent GPU machine (no registry: the wheels of shared/tools/device-wheels.sh carried in .whl/, shards carried):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 bench/train_throughput.py --shards .devcarry/shards --json $OUT/train_throughput.json

Model: a reduced-depth thinker with the released 30B-A3B shapes (hidden 2048, 32/4 heads x 128, 128 experts top-8,
expert FFN 768, vocab 152064, the real vision and audio towers; `--layers` LLM layers), random weights, everything
trained. `--tiny`: the embedded tiny config instead.

Data: the demo shards encoded by the project's task encoder (omni_model.data.task_encoder, Energon loader, packing
into rows of `--seq-len` tokens with a `--packing-buffer` sample buffer). Two batch kinds:
  mm    every sample (images, audio, video and text-only ones in the demo mix)
  text  only the samples without media (the demo set has few: rows repeat them)
The batches are encoded once, before any row runs, and every row trains on the same list: the loader's cost is not
in the step times (the training run decodes in loader worker processes, off the step).

Rows (each in its own process: clean allocator statistics; an out-of-memory loses one row, not the run):
  ours[VARIANT] KIND   omni_model.train.loop.step itself (get_forward_backward_func over forward_step, the mcore
                       optimizer and scheduler, the step's metrics) on build_training's objects (distributed
                       optimizer, bf16, fp32 grads and master weights), packed THD rows
  hf[ROW] KIND         transformers' Qwen3OmniMoeThinkerForConditionalGeneration at its best (bf16 weights and AdamW
                       states, its default grouped_mm experts), torch.optim.AdamW(fused=True on GPU), grad clipping 1.0
                       like ours, loss + router aux loss (output_router_logits, as transformers trains it). ROW:
                       flex_attention / sdpa: the SAME packed rows as ours: transformers 5.24 builds a block-causal
                       mask from the text position row when no attention mask is given
                       (masking_utils.find_packed_sequence_indices; only with use_cache=False, which the rows pass:
                       tests/test_bench_hf_packing.py); sdpa with a boolean mask (the memory-efficient kernel, no
                       flash), flex_attention with a BlockMask (GPU only: no backward on CPU in torch 2.13).
                       padded: no packing; the same samples in batches as HF Trainer's group_by_length makes them
                       (megabatches of 50 batches sorted by length, each batch right-padded to its longest), a batch
                       size that holds a packed global batch's real tokens, sdpa.
                       +fp32: fp32 weights and AdamW states under bf16 autocast (HF Trainer's bf16=True on an fp32
                       model): the precision ours trains at (fp32 masters and moments), so that precision is not
                       counted as speed. flash_attention_2 needs the flash-attn package, absent on our GPU machines.
Both models: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (unless set), the same frozen or trained towers
(`--train-towers`; frozen by default so that ours fits an 80 GB card), the same micro-batch: `--micro-batch` halved
until the planner's estimate for ours fits `--fit-gib` (printed beside the measured peak). Each row runs
`--repeats` times, round-robin, each in its own process; a row's figures are the medians of its timed steps, the
best repeat is reported with the spread, and the headline compares ours with the FASTEST transformers row per kind
(`best_transformers_row`, `ratio_vs_best_transformers`; `ratio_vs_transformers` keeps the first --hf-attn row).
Per row: real (non-padding) tokens/s, step time (wall, around the whole step), model TFLOP/s (the training run's
omni_model.train.metrics.FlopCounter on the same batches for both: LLM 6 x active params per token + causal
attention per sequence, plus the vision and audio towers; `tflops_llm` the LLM part alone), MFU against a bf16 matmul
peak measured in this run, peak memory; loss of the first and last step (a sanity check, not compared: the two
models have different random weights).

Variants of ours (`--variants`, comma separated; knobs joined with '+'; 'base' = as committed), for the GPU to judge:
  compile[=WHICH]    torch.compile of small ops: 'small' (default) RMSNorm.forward + the experts' SwiGLU
                     (experts.swiglu_with_probs), 'router' mcore's top-k routing + aux-loss functions, 'all' both
  graphs[=SCOPES]    mcore CUDA graphs, cuda_graph_impl=local, cuda_graph_scope=SCOPES (':'-separated, e.g.
                     moe_router; default: the whole layer). Graphs replay fixed shapes: run with --pad-rows. A graph
                     of a whole layer also takes the PackedSeqParams (cu_seqlens differ per batch) as a constant of
                     the capture: expect mcore to refuse it (no matching runner) rather than a speed-up.
  thd=loop           packed attention (LLM and towers) as one SDPA call per sequence instead of torch's varlen_attn
  sdpa=BACKEND       torch.nn.attention.sdpa_kernel(flash|cudnn|efficient|math) around the steps
  rope=thd           mcore's THD RoPE loop (the path before per-token RoPE), to measure that change
  ce=mcore           mcore's cross-entropy (fp32 logits, a dozen passes) instead of model.cross_entropy's fused one
  gradscale=mcore    mcore's 1/tokens and clip passes over the grad buffers instead of build.FoldedGradScale
  linear=mcore       mcore's linear autograd Function at one TP rank instead of model.linear's plain F.linear
  dispatch=mcore     mcore's allgather token dispatcher (host syncs) instead of dispatcher.StaticAllGatherTokenDispatcher
  cfg.KEY=VALUE      any TransformerConfig field (VALUE as JSON where it parses), e.g. cfg.moe_token_dispatcher_type=alltoall
  train.KEY=VALUE    any train.* setting, e.g. train.recompute=selective
Writes `--json` (default bench/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from omni_model.model.options import PerfOptions  # noqa: E402

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


# -- model and data ------------------------------------------------------------------------------------------------
def model_config(tiny: bool, layers: int) -> dict:
    from omni_model.configs import released_30b_a3b_config
    from omni_model.tiny import tiny_variant

    config = tiny_variant(text={"num_hidden_layers": layers}) if tiny else released_30b_a3b_config()
    config["thinker_config"]["text_config"]["num_hidden_layers"] = layers
    if not tiny:  # the talker is not trained: keep its config small (it reads an LLM layer that must exist)
        config["talker_config"]["accept_hidden_layer"] = min(config["talker_config"]["accept_hidden_layer"], layers)
    return config


def write_hf_dir(work: Path, tiny: bool, layers: int) -> Path:
    """config.json + the real tokenizer, chat template and preprocessor files: what the task encoder and both
    models read (no weights: every row initialises its own)."""
    from omni_model.random_checkpoint import write_config_files

    hf_dir = work / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    write_config_files(hf_dir, model_config(tiny, layers))
    return hf_dir


def encoder_class(kind: str, sample_lists: bool = False):
    """The project's task encoder for a batch kind: `text` skips the samples with media (before any decoding);
    `sample_lists`: `batch` hands the encoded samples back as a list, for the bench to group them itself."""
    from megatron.energon import SkipSample, stateless

    from omni_model.data.task_encoder import OmniTaskEncoder

    class BenchTaskEncoder(OmniTaskEncoder):
        @stateless
        def encode_sample(self, sample):
            if kind == "text" and sample.media:
                raise SkipSample()
            return super().encode_sample(sample)

        def batch(self, samples):
            return list(samples) if sample_lists else super().batch(samples)

    return BenchTaskEncoder


def encode_batches(hf_dir: Path, shards: Path, kind: str, count: int, seq_len: int, buffer: int, workers: int,
                   pad_rows: bool = False, rows: int = 1):
    """`count` packed micro-batches of `rows` rows (each row <= seq_len tokens, exactly seq_len with `pad_rows`) from
    the train split."""
    pad_to = seq_len if pad_rows else 1
    from megatron.energon import WorkerConfig

    from omni_model.data.task_encoder import build_loader

    encoder = encoder_class(kind)(hf_dir, max_seq_len=seq_len, pack_budget=seq_len, pad_to_multiple=pad_to)
    loader = build_loader(shards, encoder, split="train", batch_size=rows, packing_buffer_size=buffer,
                          worker_config=WorkerConfig(rank=0, world_size=1, num_workers=workers),
                          shuffle_buffer_size=64, repeat=True)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def encode_padded_batches(hf_dir: Path, shards: Path, kind: str, count: int, tokens_per_step: float, seq_len: int,
                          workers: int) -> list:
    """`count` unpacked batches for transformers' padded row, made as HF Trainer's `group_by_length` makes them: a
    fixed number of samples per batch (chosen so that a batch holds about `tokens_per_step` real tokens, as the
    packed rows do), megabatches of 50 batches sorted by length (longest first), each batch right-padded to its
    longest sample. The samples come from the same train split and the same task encoder as the packed rows."""
    from megatron.energon import WorkerConfig

    from omni_model.data.batch import collate
    from omni_model.data.task_encoder import build_loader

    encoder = encoder_class(kind, sample_lists=True)(hf_dir, max_seq_len=seq_len)
    loader = build_loader(shards, encoder, split="train", batch_size=1,
                          worker_config=WorkerConfig(rank=0, world_size=1, num_workers=workers),
                          shuffle_buffer_size=64, repeat=True)
    stream = (samples[0] for samples in loader)
    probe = [next(stream) for _ in range(64)]
    per_batch = max(1, round(tokens_per_step / (sum(s.length for s in probe) / len(probe))))
    samples = probe + [next(stream) for _ in range(max(0, count * per_batch - len(probe)))]
    batches = []
    for start in range(0, count * per_batch, 50 * per_batch):  # group_by_length's megabatches
        mega = sorted(samples[start:start + 50 * per_batch], key=lambda s: s.length, reverse=True)
        batches += [collate(mega[i:i + per_batch], pad_id=encoder.encoder.pad_id, packed=False)
                    for i in range(0, len(mega), per_batch)]
    return batches[:count]


def describe(batches: list, seq_len: int) -> dict:
    """What the rows train on: tokens, fill, sequences, media counts."""
    rows = sum(b.input_ids.shape[0] for b in batches)
    return {"micro_batches": len(batches), "rows": rows, "real_tokens": sum(b.num_tokens for b in batches),
            "fill_of_seq_len": sum(b.num_tokens for b in batches) / max(rows * seq_len, 1),
            "sequences": sum(len(r) for b in batches for r in b.sample_ids),
            "images": sum(len(b.image_grid_thw) for b in batches if b.image_grid_thw is not None),
            "videos": sum(len(b.video_grid_thw) for b in batches if b.video_grid_thw is not None),
            "audios": sum(len(b.input_features) for b in batches if b.input_features is not None)}


# -- measurement ---------------------------------------------------------------------------------------------------
def matmul_peak_tflops(device: str) -> float:
    """A large matmul in a loop: bf16 8192^3 on GPU (fp32 1024^3 on CPU, only so that the CPU run has a number)."""
    n, dtype, iters = (8192, torch.bfloat16, 50) if device == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def sdpa_context(backend: str):
    """A factory of `sdpa_kernel(backend)` contexts (each context manager is good for one `with`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA_BACKENDS[backend])
    return lambda: sdpa_kernel(chosen)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step, warmup: int, steps: int, device: str, peak: float, profile: str = "", stacks: int = 0) -> dict:
    """`step()` -> (loss, the TokenCounter's counts of its batches, model FLOPs by part). Warm-up steps, then `steps`
    steps timed from outside (wall time, synchronised). `profile`: a file for the torch profiler's tables of one more
    step (not timed); `stacks` > 0: also by op and that many Python frames of its caller."""
    from omni_model.train.metrics import memory_gib

    losses = [step()[0] for _ in range(warmup)]
    sync(device)
    times, step_tokens, step_flops, tokens, flops = [], [], [], 0, {}
    for _ in range(steps):
        start = time.perf_counter()
        loss, seen, parts = step()
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss)
        tokens += seen["tokens"]
        step_tokens.append(seen["tokens"])
        step_flops.append(sum(parts.values()))
        flops = {part: flops.get(part, 0.0) + value for part, value in parts.items()}
    if profile:
        profile_step(step, device, Path(profile), stacks)
    seconds = sum(times)
    # medians over the timed steps: robust to a slow outlier (an allocator grow, a host hiccup) in either model's rows
    rates = [t / s for t, s in zip(step_tokens, times)]
    tflops = statistics.median(f / s for f, s in zip(step_flops, times)) / 1e12
    return {"step_s": statistics.median(times), "step_s_mean": seconds / steps, "step_s_min": min(times),
            "step_s_max": max(times), "tokens_per_step": tokens / steps, "tokens_per_s": statistics.median(rates),
            "tokens_per_s_mean": tokens / seconds, "timed_steps": steps, "tflops": tflops,
            "tflops_llm": tflops * flops.get("llm", 0.0) / max(sum(flops.values()), 1e-30), "mfu": tflops / peak,
            "flops_share": {part: value / max(sum(flops.values()), 1e-30) for part, value in flops.items()},
            "mem_gib": memory_gib(), "loss_first": losses[0], "loss_last": losses[-1]}


def profile_step(step, device: str, path: Path, stacks: int = 0) -> None:
    """One step under the torch profiler: the ops by self device time and by self host time (where the host-side
    Python per layer shows), written as text; with `stacks`, a third table by op and caller (recording the stacks
    slows the profiled step's host side: its wall time is then no guide)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    # the Python frames reach key_averages only with the verbose experimental config (torch 2.11-2.13)
    frames = ({"with_stack": True, "experimental_config": torch._C._profiler._ExperimentalConfig(verbose=True)}
              if stacks else {})
    with profile(activities=activities, **frames) as prof:
        step()
        sync(device)
    wall_ms = 1e3 * (time.perf_counter() - start)
    table = prof.key_averages()
    device_key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    try:
        busy = gpu_busy(prof, wall_ms) if device == "cuda" else ""
    except Exception as error:  # noqa: BLE001 - a profiler API difference must not lose the row's measurement
        busy = f"GPU busy time not computed: {error!r}\n\n"
    by_caller = ""
    if stacks:
        grouped = prof.key_averages(group_by_stack_n=stacks)
        by_caller = f"\n\nby {device_key}, op and caller\n{grouped.table(sort_by=device_key, row_limit=40)}\n"
    path.write_text(f"{busy}"
                    f"by {device_key}\n{table.table(sort_by=device_key, row_limit=40)}\n\nby self_cpu_time_total\n"
                    f"{table.table(sort_by='self_cpu_time_total', row_limit=40)}\n{by_caller}")


def gpu_busy(prof, wall_ms: float) -> str:
    """What the GPU really did in the profiled step: the kernels' and copies' own time, and the union of their
    intervals (busy time). The op table's "Self CUDA time total" counts each kernel twice (under its op and as a
    kernel row) and annotated ranges once more."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and e.time_range.end > e.time_range.start]
    busy, end = 0.0, float("-inf")
    for e in sorted(kernels, key=lambda e: e.time_range.start):
        lo, hi = e.time_range.start, e.time_range.end
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    own = sum(e.time_range.end - e.time_range.start for e in kernels)
    return (f"GPU: {len(kernels)} kernels and copies, {own / 1e3:.1f} ms of their own time, busy {busy / 1e3:.1f} ms "
            f"of the profiled step's {wall_ms:.1f} ms wall (under the profiler)\n\n")


# -- ours ----------------------------------------------------------------------------------------------------------
def parse_variant(variant: str) -> dict:
    knobs = {}
    for knob in filter(None, variant.split("+")):
        if knob == "base":
            continue
        key, _, value = knob.partition("=")
        knobs[key] = value
    return knobs


def _json_or_str(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def compile_ops(which: str) -> None:
    """torch.compile in place of small eager ops: 'small' = RMSNorm + SwiGLU, 'router' = mcore's top-k routing and
    aux-loss functions (as the router module calls them), 'all' = both."""
    if which not in ("small", "router", "all"):
        raise SystemExit(f"compile={which}: one of small, router, all")
    if which in ("small", "all"):
        from omni_model.model import experts, norm

        experts.swiglu_with_probs = torch.compile(experts.swiglu_with_probs)
        norm.RMSNorm.forward = torch.compile(norm.RMSNorm.forward)
    if which in ("router", "all"):
        from megatron.core.transformer.moe import router

        for name in ("topk_routing_with_score_function", "compute_routing_scores_for_aux_loss",
                     "switch_load_balancing_loss_func"):
            setattr(router, name, torch.compile(getattr(router, name)))


# knob=mcore: one of our parts switched back to mcore's own (the PerfOptions field set to False, what runs instead),
# the same-run baseline of that change
MCORE_BASELINES = {
    "ce": ("fuse_ce_on_gpu", "mcore's unfused cross-entropy"),
    "gradscale": ("fold_grad_scale", "mcore's scaling passes"),
    "linear": ("plain_matmul_when_local", "mcore's linear autograd Function"),
    "dispatch": ("static_dispatch", "mcore's allgather dispatcher"),
}


def mcores_own(knob: str, value: str) -> dict:
    """The PerfOptions field (set to False) of a knob=mcore variant."""
    field, what = MCORE_BASELINES[knob]
    if value != "mcore":
        raise SystemExit(f"{knob}={value}: only {knob}=mcore ({what}) is a variant")
    return {field: False}


def apply_variant(knobs: dict) -> tuple[dict, dict, object, PerfOptions]:
    """The switches of a variant -> (TransformerConfig overrides, train overrides, a factory of the context each step
    runs in, the model's performance options)."""
    config, train, context, options = {}, {}, nullcontext, {}
    for key, value in knobs.items():
        if key == "compile":
            compile_ops(value or "small")
        elif key == "graphs":
            config["cuda_graph_impl"] = "local"
            config["cuda_graph_scope"] = value.split(":") if value else []
        elif key == "thd":
            options["packed_kernel"] = value
        elif key == "sdpa":
            context = sdpa_context(value)
        elif key == "rope":
            if value != "thd":
                raise SystemExit(f"rope={value}: only rope=thd (mcore's THD loop) is a variant")
        elif key in MCORE_BASELINES:
            options.update(mcores_own(key, value))
        elif key.startswith("cfg."):
            config[key[4:]] = _json_or_str(value)
        elif key.startswith("train."):
            train[key[6:]] = _json_or_str(value)
        else:
            raise SystemExit(f"unknown variant knob {key!r} (see the module docstring)")
    return config, train, context, PerfOptions(**options)


def build_ours_step(spec: dict, batches: list, peak: float):
    """The training run's objects for `spec` -> `step()`, one optimizer step of omni_model.train.loop on the next
    `global_batch` rows of `batches`: (loss, {"tokens": real tokens}, model FLOPs by part)."""
    from omni_model.train import build, loop
    from omni_model.train.data import TokenCounter
    from omni_model.train.forward_step import forward_step
    from omni_model.train.metrics import FlopCounter
    from omni_model.train.settings import TrainSettings
    from planner_check import init_weights

    knobs = parse_variant(spec["variant"])
    config_extra, train_extra, context, options = apply_variant(knobs)
    if config_extra:  # the TransformerConfig fields a variant sets, on top of the training run's own
        base_overrides = build.model_config_overrides
        build.model_config_overrides = lambda settings: {**base_overrides(settings), **config_extra}
    on_gpu = spec["device"] == "cuda"
    train = {"iters": spec["warmup"] + spec["steps"], "lr_warmup_iters": 1, "global_batch_size": spec["global_batch"],
             "micro_batch_size": spec["micro_batch"], "seq_len": spec["seq_len"], "packing": True,
             "gpus_per_node": int(on_gpu), "cpu_procs": 1, **frozen_towers(spec), **train_extra}
    work = Path(spec["work"])
    settings = TrainSettings(hf_dir=spec["hf_dir"], init_checkpoint="", shards="", train_dir=str(work / "ours"),
                             train=train)
    build.init_training_parallel(settings)
    if "graphs" in knobs:  # mcore's CUDA-graph manager needs a graph-safe RNG tracker (asserted at build)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(settings.train.seed, use_cudagraphable_rng=True, force_reset_rng=True)
    # LoRA rows: no base checkpoint to load (init_weights fills every weight next)
    training = build.build_training(settings, load_initial_weights=False, load_base=lambda thinker: None,
                                    options=options)
    init_weights(training.thinker)
    training.optimizer.reload_model_params()  # the optimizer's fp32 masters copied the uninitialised weights
    if knobs.get("rope") == "thd":
        training.thinker.language_model.per_token_rope = False
    run = loop.Run(settings=settings, training=training, forward_step=forward_step, digest="bench", loader=None,
                   batches=TokenCounter(iter(batches)), evaluation=[], flops=FlopCounter(spec["hf_dir"], settings.train),
                   peak=peak, log=None)
    training.model.train()
    iteration = itertools.count(1)

    def step():  # omni_model.train.loop's own step (schedule, optimizer, scheduler, its metrics)
        with context():
            record = loop.step(run, next(iteration))
        parts = {part: record[f"flops_{part}"] for part in ("llm", "vision", "audio")}
        return record["loss"], {"tokens": record["tokens"]}, parts

    step.model = training.model  # for the tests that look inside (tests/test_host_syncs.py)
    return step


def run_ours(spec: dict, batches: list, peak: float) -> dict:
    step = build_ours_step(spec, batches, peak)
    return measure(step, spec["warmup"], spec["steps"], spec["device"], peak, spec["profile"], spec["stacks"])


# -- transformers --------------------------------------------------------------------------------------------------
def text_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed token inside its own sequence (restarts at each cu_seqlens bound)."""
    index = torch.arange(total)
    sequence = torch.searchsorted(cu_seqlens[1:].long(), index, right=True)
    return index - cu_seqlens.long()[sequence]


def hf_inputs(batch, device) -> dict:
    """transformers' keywords for a packed batch: no attention mask, and a text position row on top of the MRoPE
    rows ([4, B, S]): transformers derives the sequence boundaries (a block-causal mask) from that row. Only without
    a KV cache: with one (use_cache defaults to the config's True) it skips the detection and attends across the
    packed sequences (seen: 0.9 logit error vs each sequence alone; 4e-7 with use_cache=False)."""
    inputs = dict(batch.hf_inputs(), use_cache=False)
    if batch.cu_seqlens is not None:
        b, s = batch.input_ids.shape
        text = text_positions(batch.cu_seqlens, b * s).view(1, b, s).to(batch.position_ids.dtype)
        inputs["position_ids"] = torch.cat([text, batch.position_ids], dim=0)
        inputs.pop("attention_mask")
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


HF_ATTENTION = {"flex_attention": "flex_attention", "sdpa": "sdpa", "padded": "sdpa"}


def parse_hf_variant(variant: str) -> tuple[str, bool]:
    """'ATTN[+fp32]' -> (ATTN, fp32 masters). ATTN: flex_attention | sdpa (packed rows, a block-causal mask) |
    padded (length-grouped padded batches, sdpa). '+fp32': fp32 weights and AdamW states, bf16 autocast (HF
    Trainer's `bf16=True` on an fp32-loaded model): the same precision as ours."""
    attn, _, precision = variant.partition("+")
    if attn not in HF_ATTENTION or precision not in ("", "fp32"):
        raise SystemExit(f"transformers row {variant!r}: ATTN[+fp32] with ATTN one of {sorted(HF_ATTENTION)}")
    return attn, precision == "fp32"


def frozen_towers(spec: dict) -> dict:
    """The train.* switches of the bench's tower setting (the same for both models)."""
    frozen = not spec.get("train_towers", True)
    return {"freeze_vision": frozen, "freeze_audio": frozen}


def build_hf(hf_dir: str, attn: str, device: str, fp32: bool = False, train_towers: bool = True):
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    config = Qwen3OmniMoeConfig(**json.loads((Path(hf_dir) / "config.json").read_text())).thinker_config
    dtype = torch.bfloat16 if device == "cuda" and not fp32 else torch.float32
    with torch.device(device):
        model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                          dtype=dtype)
    if HF_ATTENTION[attn] != "sdpa":  # the text model only: the towers support sdpa/flash, not flex
        model.config.text_config._attn_implementation = HF_ATTENTION[attn]
    if not train_towers:
        model.model.visual.requires_grad_(False)
        model.model.audio_tower.requires_grad_(False)
    return model.train()


def run_hf(spec: dict, batches: list, peak: float) -> dict:
    from omni_model.train.data import TokenCounter
    from omni_model.train.metrics import FlopCounter

    device = spec["device"]
    attn, fp32 = parse_hf_variant(spec["variant"])
    torch.manual_seed(0)
    model = build_hf(spec["hf_dir"], attn, device, fp32, spec["train_towers"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=device == "cuda")
    counter = TokenCounter(iter(batches))
    flops = FlopCounter(spec["hf_dir"], frozen_towers(spec))
    # padded batches: one batch is the step (its size was chosen to hold a packed global batch's tokens)
    micro_batches = 1 if attn == "padded" else spec["global_batch"] // spec["micro_batch"]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if fp32 and device == "cuda" else nullcontext

    def step():
        micro = [next(counter) for _ in range(micro_batches)]
        label_tokens = sum(b.num_trained for b in micro)
        total = torch.zeros((), device=device)
        for batch in micro:  # gradient accumulation: token-mean over the global batch, as ours
            with autocast():
                out = model(**hf_inputs(batch, device), output_router_logits=True)
            loss = out.loss * (batch.num_trained / label_tokens)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen = counter.take()
        return float(total), seen, flops(seen)

    return measure(step, spec["warmup"], spec["steps"], device, peak, spec["profile"], spec["stacks"])


def run_row(spec: dict) -> dict:
    torch.manual_seed(0)
    padded = spec["impl"] == "hf" and parse_hf_variant(spec["variant"])[0] == "padded"
    batches = torch.load(spec["batches"], weights_only=False)[spec["kind"] + ("_padded" if padded else "")]
    if spec["device"] == "cuda":  # as the training loader delivers them (energon pins: OmniBatch.pin_memory)
        batches = [batch.pin_memory() for batch in batches]
    context = sdpa_context(spec["sdpa"]) if spec["impl"] == "hf" and spec["sdpa"] else nullcontext
    with context():
        result = (run_ours if spec["impl"] == "ours" else run_hf)(spec, batches, spec["peak"])
    return result


# -- driver --------------------------------------------------------------------------------------------------------
def row_name(spec: dict) -> str:
    return f"{spec['impl']}[{spec['variant']}] {spec['kind']}"


def best_of_repeats(rows: list) -> dict:
    """{(impl, variant, kind): the repeat with the most tokens/s, with every repeat's tokens/s and their spread}."""
    groups: dict = {}
    for r in rows:
        if "failed" not in r:
            groups.setdefault((r["impl"], r["variant"], r["kind"]), []).append(r)
    best = {}
    for key, runs in groups.items():
        rates = [r["tokens_per_s"] for r in runs]
        best[key] = {**max(runs, key=lambda r: r["tokens_per_s"]), "tokens_per_s_runs": rates,
                     "spread": (max(rates) - min(rates)) / min(rates)}
    return best


def run_child(spec: dict, timeout: int, cpu: bool, script: str = __file__, require_success: bool = False) -> dict:
    """`script --one <spec>` in its own process (clean peak-memory statistics; an out-of-memory loses one row): its
    last RESULT line, or why it failed. `require_success`: a RESULT line from a process that then failed counts as a
    failure (bench/eval_throughput.py's phases)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # both models with the allocator setting that avoids cudaMalloc/cudaFree churn near the card's limit
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        proc = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"failed": f"timeout after {timeout} s"}
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if found and (proc.returncode == 0 or not require_success):
        return json.loads(found[-1][len("RESULT "):])
    return {"failed": (proc.stderr or proc.stdout)[-3000:]}


def print_row(name: str, r: dict) -> None:
    if "failed" in r:
        print(f"{name:44s} FAILED: {r['failed'][-600:]}", flush=True)
        return
    planned = f"{r['planned_gib']:>8.1f}" if r.get("planned_gib") else f"{'':>8s}"
    print(f"{name:44s} {r['tokens_per_s']:>10.0f} {1e3 * r['step_s']:>9.1f} {r['tflops']:>8.1f} "
          f"{100 * r['mfu']:>6.1f}% {r['mem_gib']:>8.1f} {planned}  {r['loss_first']:.3f} -> {r['loss_last']:.3f}",
          flush=True)


def headline(rows: list, peak: float, device: str, args) -> dict:
    best = best_of_repeats(rows)
    out = {"device": device, "card": device,
           "model": ("tiny" if args.tiny else "30B-A3B layer shapes") + f", {args.layers} layers"
           + (", towers trained" if args.train_towers else ", towers frozen"),
           "seq_len": args.seq_len, "pad_rows": args.pad_rows, "global_batch_rows": args.global_batch,
           "micro_batch_rows": args.micro_batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
           "matmul_peak_tflops": peak, "torch": torch.__version__,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    base = args.variants[0]
    hf_first = args.hf_attn[0] if args.hf_attn else None
    out["transformers_rows"] = [{"row": f"hf[{v}] {k}", "tokens_per_s_runs": r["tokens_per_s_runs"],
                                 "spread": r["spread"], "tflops": r["tflops"], "mfu": r["mfu"],
                                 "mem_gib": r["mem_gib"]}
                                for (impl, v, k), r in best.items() if impl == "hf"]
    out["best_transformers_row"], out["ratio_vs_best_transformers"] = {}, {}
    for kind, suffix in (("mm", ""), ("text", "_text")):
        ours, hf = best.get(("ours", base, kind)), best.get(("hf", hf_first, kind))
        out[f"tokens_per_s_ours{suffix}"] = ours and ours["tokens_per_s"]
        out[f"tokens_per_s_transformers{suffix}"] = hf and hf["tokens_per_s"]
        out[f"ratio_vs_transformers{suffix}"] = ours and hf and ours["tokens_per_s"] / hf["tokens_per_s"]
        out[f"mfu_ours{suffix}"] = ours and ours["mfu"]
        out[f"tflops_ours{suffix}"] = ours and ours["tflops"]
        out[f"tflops_llm_ours{suffix}"] = ours and ours["tflops_llm"]
        out[f"mfu_transformers{suffix}"] = hf and hf["mfu"]
        out[f"planned_gib_ours{suffix}"] = ours and ours.get("planned_gib")
        out[f"mem_gib_ours{suffix}"] = ours and ours["mem_gib"]
        fastest = max(((v, r) for (impl, v, k), r in best.items() if impl == "hf" and k == kind),
                      key=lambda vr: vr[1]["tokens_per_s"], default=None)
        if fastest:
            out["best_transformers_row"][kind] = f"hf[{fastest[0]}] {kind}"
            out["ratio_vs_best_transformers"][kind] = ours and ours["tokens_per_s"] / fastest[1]["tokens_per_s"]
    out["headline_rows"] = {"ours": f"ours[{base}]", "transformers": f"hf[{hf_first}]",
                            "best_transformers": out["best_transformers_row"]}
    return out


def print_summary(out: dict) -> None:
    """The transformers rows with their spread over repeats, and ours against the fastest of them per batch kind."""
    print("\ntransformers rows (best of repeats; spread = (max - min) / min tokens/s over the repeats):")
    for r in out["transformers_rows"]:
        print(f"  {r['row']:36s} {max(r['tokens_per_s_runs']):>10.0f} tokens/s  spread {100 * r['spread']:5.1f} %  "
              f"MFU {100 * r['mfu']:5.1f} %")
    for kind, suffix in (("mm", ""), ("text", "_text")):
        ratio = out["ratio_vs_best_transformers"].get(kind)
        if ratio:
            print(f"  {kind}: ours {out[f'tokens_per_s_ours{suffix}']:.0f} tokens/s, MFU "
                  f"{100 * out[f'mfu_ours{suffix}']:.1f} % = {ratio:.2f}x {out['best_transformers_row'][kind]}")


def fitting_micro_batch(hf_dir: Path, args) -> tuple[int, float]:
    """The largest micro-batch (halving --micro-batch) whose planned peak for ours fits --fit-gib, and that plan's
    GiB: the bench's default shapes must run on an 80 GB card as on a 141 GB one."""
    from omni_model.plan import GIB, check_run

    hf_config = json.loads((hf_dir / "config.json").read_text())
    micro = args.micro_batch
    while True:
        train = {"micro_batch_size": micro, "seq_len": args.seq_len, "recompute": "none", "freeze_llm": False,
                 **frozen_towers({"train_towers": args.train_towers}), "global_batch_size": args.global_batch}
        parallel = {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "cp": 1, "first_stage_layers": None}
        planned = check_run(hf_config, train, parallel, 1, on_gpu=not args.cpu).total / GIB
        if planned <= args.fit_gib or micro == 1:
            return micro, planned
        micro //= 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", help="Energon shards (the demo set: results/data/shards)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=4, help="packed rows per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=4, help="packed rows per micro-batch (both models; ours takes "
                    "them as one THD row). 4 = the global batch in one micro-batch: on the H200 both models ran "
                    "fastest so (bench/RESULTS.md)")
    ap.add_argument("--packing-buffer", type=int, default=128, help="samples buffered per packing decision")
    ap.add_argument("--data-workers", type=int, default=0, help="loader processes for the one-off encoding")
    ap.add_argument("--kinds", default="mm,text", help="batch kinds: mm,text")
    ap.add_argument("--pad-rows", action="store_true", help="pad every packed row to exactly --seq-len (static "
                    "shapes for CUDA-graph variants; the padding is its own segment and no real token)")
    ap.add_argument("--variants", default="base", help="variants of ours, comma separated (module docstring)")
    ap.add_argument("--hf-attn", default="flex_attention,sdpa,padded,flex_attention+fp32",
                    help="transformers rows, ATTN[+fp32]: flex_attention / sdpa (packed rows), padded (length-grouped "
                    "padded batches), +fp32 (fp32 masters and Adam states under bf16 autocast, ours' precision); "
                    "'' = none. The headline compares ours with the fastest")
    ap.add_argument("--repeats", type=int, default=2, help="each row measured this many times (own process each); "
                    "the best is reported with the spread")
    ap.add_argument("--train-towers", action="store_true", help="train the vision and audio towers in both models "
                    "(default frozen: the towers' fp32 masters and Adam states do not fit an 80 GB card with ours)")
    ap.add_argument("--fit-gib", type=float, default=78.0, help="halve --micro-batch until the planner's estimate "
                    "for ours fits this many GiB (an H100 80GB has ~78 usable)")
    ap.add_argument("--hf-sdpa", default="", help="sdpa_kernel backend for the transformers rows (default: torch's)")
    ap.add_argument("--tiny", action="store_true", help="the tiny config (CPU smoke run)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (fp32, gloo, plain optimizer)")
    ap.add_argument("--work", default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per row")
    ap.add_argument("--profile", action="store_true", help="one more step per row under the torch profiler: "
                    "profile_<row>.txt next to --json (one more batch per kind is encoded for it)")
    ap.add_argument("--profile-stacks", type=int, default=0, metavar="N",
                    help="with --profile: a third table by op and its N innermost Python callers (where copy_/mul run)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one row (JSON spec) in this process
    args = ap.parse_args()

    if args.one:
        spec = json.loads(args.one)
        if spec["device"] == "cpu":
            torch.set_num_threads(1)
        print("RESULT " + json.dumps(run_row(spec)), flush=True)
        return 0
    if not args.shards:
        ap.error("--shards is required")

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    if device == "cpu":
        torch.set_num_threads(1)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()] or ["base"]
    args.hf_attn = [a.strip() for a in args.hf_attn.split(",") if a.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    work = Path(args.work or tempfile.mkdtemp(prefix="train_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # the profiles go next to it

    began = time.perf_counter()
    hf_dir = write_hf_dir(work, args.tiny, args.layers)
    if args.global_batch % args.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    requested = args.micro_batch
    args.micro_batch, planned_gib = fitting_micro_batch(hf_dir, args)
    print(f"micro-batch {args.micro_batch} (asked {requested}): planned peak for ours {planned_gib:.1f} GiB "
          f"(fit {args.fit_gib} GiB)", flush=True)
    count = args.global_batch // args.micro_batch * (args.warmup + args.steps + int(args.profile))
    batches = {kind: encode_batches(hf_dir, Path(args.shards).resolve(), kind, count, args.seq_len,
                                    args.packing_buffer, args.data_workers, args.pad_rows, args.micro_batch)
               for kind in kinds}
    if any(parse_hf_variant(a)[0] == "padded" for a in args.hf_attn):
        steps = args.warmup + args.steps + int(args.profile)
        for kind in kinds:
            per_step = sum(b.num_tokens for b in batches[kind]) / steps
            batches[kind + "_padded"] = encode_padded_batches(hf_dir, Path(args.shards).resolve(), kind, steps,
                                                              per_step, args.seq_len, args.data_workers)
    data = {kind: describe(b, args.seq_len) for kind, b in batches.items()}
    torch.save(batches, work / "batches.pt")
    print(f"encoded {count} micro-batches per kind in {time.perf_counter() - began:.1f} s: {data}", flush=True)
    peak = matmul_peak_tflops(device)
    if device == "cuda":
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"device {name}: measured matmul peak {peak:.1f} TFLOP/s "
          f"({'bf16 8192^3' if device == 'cuda' else 'fp32 1024^3'})", flush=True)

    common = {"device": device, "hf_dir": str(hf_dir), "batches": str(work / "batches.pt"), "work": str(work),
              "peak": peak, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
              "global_batch": args.global_batch, "micro_batch": args.micro_batch, "sdpa": args.hf_sdpa,
              "stacks": args.profile_stacks, "train_towers": args.train_towers}
    for attn in args.hf_attn:
        parse_hf_variant(attn)  # an unknown row stops here, before any row runs
    rounds = range(args.repeats)  # round-robin: a repeat of a row runs minutes after its first run, not right after
    specs = [{**common, "impl": "ours", "variant": v, "kind": k, "repeat": i} for i in rounds for k in kinds
             for v in args.variants]
    specs += [{**common, "impl": "hf", "variant": a, "kind": k, "repeat": i} for i in rounds for k in kinds
              for a in args.hf_attn]
    for spec in specs:
        slug = "".join(c if c.isalnum() else "_" for c in row_name(spec))
        spec["profile"] = str(Path(args.json).parent / f"profile_{slug}.txt") if args.profile and not spec["repeat"] \
            else ""
    print(f"{'row':44s} {'tokens/s':>10s} {'step ms':>9s} {'TFLOP/s':>8s} {'MFU':>7s} {'mem GiB':>8s} "
          f"{'planned':>8s}  loss   (medians of {args.steps} timed steps)", flush=True)
    rows = []
    for spec in specs:
        result = run_child(spec, args.timeout, device == "cpu")
        label = row_name(spec) + (f" sdpa={spec['sdpa']}" if spec["impl"] == "hf" and spec["sdpa"] else "") \
            + (f" #{spec['repeat'] + 1}" if args.repeats > 1 else "")
        if spec["impl"] == "ours" and "failed" not in result:
            result["planned_gib"] = planned_gib
        print_row(label, result)
        rows.append({"row": label, "impl": spec["impl"], "variant": spec["variant"], "kind": spec["kind"],
                     "repeat": spec["repeat"], **result})

    out = headline(rows, peak, name, args)
    print_summary(out)
    out.update({"data": data, "rows": rows, "command": " ".join(sys.argv), "wall_s": time.perf_counter() - began})
    print(json.dumps({k: v for k, v in out.items() if k not in ("rows", "data")}, indent=1))
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
