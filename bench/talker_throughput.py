"""Talker training steps on one GPU at the released talker shapes (reduced depth): ours against transformers.

    python bench/talker_throughput.py                         # GPU: released talker shapes, --layers 4 of 20
    python bench/talker_throughput.py --cpu --tiny --steps 3  # CPU smoke run (the tiny config, fp32)

On a lent GPU machine (wheels carried as for bench/train_throughput.py):
    PYTHONPATH=/tmp/site:$PWD python3 bench/talker_throughput.py --json $OUT/talker_throughput.json

Model: the released 30B-A3B talker (hidden 1024, 16/2 heads x 128, 128 experts top-6 + a shared expert, expert FFN
384, codec vocabulary 3072; the code predictor's 5 dense layers, 16 code groups) with `--layers` MoE decoder layers,
random weights, everything trained. Batch: `--rows` talker sequences of `--seq` positions in generate's layout
(a prompt of `--prompt` positions whose thinker states are random, then teacher-forced frames; every frame also
trains the code predictor: 16 positions each), the same batch every step.

Rows (same process, one after the other; peak memory reset between them):
  ours    omni_model.train.talker_step through build_talker_training (mcore DDP, the distributed optimizer, bf16
          params with fp32 grads and masters) and train.loop.optimizer_step (mcore's schedule, clipping, scheduler)
  hf      transformers' Qwen3OmniMoeTalkerForConditionalGeneration at the same config, bf16 weights, its default
          grouped_mm experts, torch.optim.AdamW(fused=True), clip 1.0; loss = its first-group CE + the code
          predictor's CE of groups 1..15 in one teacher-forced pass (its model + lm_head[g] at position g + 1)

Reported per row: median step time of `--steps` (after `--warmup`), talker positions/s, model TFLOP/s and MFU (FLOPs:
6 x active decoder parameters incl. the shared expert x positions + 6 x predictor parameters x 16 x frames;
attention scores not counted), peak GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_config(args) -> dict:
    from omni_model.configs import released_30b_a3b_config, tiny_config

    config = copy.deepcopy(tiny_config() if args.tiny else released_30b_a3b_config())
    if not args.tiny:
        config["talker_config"]["text_config"]["num_hidden_layers"] = args.layers
    return config


def synthetic_batch(config: dict, rows: int, seq: int, prompt: int, seed: int = 0):
    """A TalkerBatch in generate's layout (train.talker_inputs): `prompt` positions of thinker states (a few
    multimodal), 6 codec control ids ending in codec BOS, then frames fed back; the last position predicts EOS."""
    from omni_model.train.talker_step import IGNORE, TalkerBatch

    talker = config["talker_config"]
    ht, groups = talker["thinker_hidden_size"], talker["num_code_groups"]
    vocab = talker["code_predictor_config"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(rows, seq, ht, generator=g)
    mm = torch.zeros(rows, seq, dtype=torch.bool)
    mm[:, 1:prompt // 2] = True
    hidden = torch.randn(int(mm.sum()), ht, generator=g)
    codes = torch.full((rows, seq, groups), -1, dtype=torch.long)
    special = [talker["codec_nothink_id"], talker["codec_think_bos_id"], talker["codec_think_eos_id"],
               next(iter(talker["speaker_id"].values())), talker["codec_pad_id"], talker["codec_bos_id"]]
    codes[:, prompt - 6:prompt, 0] = torch.tensor(special)
    frames = seq - prompt
    values = torch.randint(0, vocab, (rows, frames, groups), generator=g)
    codes[:, prompt:] = values
    labels = torch.full((rows, seq), IGNORE, dtype=torch.long)
    labels[:, prompt - 1:seq - 1] = values[..., 0]
    labels[:, seq - 1] = talker["codec_eos_token_id"]
    positions = torch.arange(seq, dtype=torch.float32).view(1, 1, seq).expand(3, rows, seq).contiguous()
    frame_positions = torch.tensor([r * seq + prompt - 1 + k for r in range(rows) for k in range(frames)])
    return TalkerBatch(thinker_embeds=embeds, multimodal_mask=mm, thinker_hidden=hidden, codec_codes=codes,
                       position_ids=positions, labels=labels, frame_positions=frame_positions,
                       frame_codes=values.reshape(-1, groups))


def model_flops(config: dict, batch) -> float:
    from omni_model.configs import code_predictor_config_of, talker_text_config_of
    from omni_model.model.language_model import count_parameters

    text = talker_text_config_of(config)
    shared = 3 * text["hidden_size"] * int(text.get("shared_expert_intermediate_size") or 0)
    decoder = count_parameters(text, include_embeddings=False)["active"] + shared * text["num_hidden_layers"]
    predictor = count_parameters(code_predictor_config_of(config), include_embeddings=False)["active"]
    groups = config["talker_config"]["num_code_groups"]
    return 6.0 * decoder * batch.labels.numel() + 6.0 * predictor * groups * batch.frame_codes.shape[0]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, steps: int, warmup: int) -> list:
    times = []
    for i in range(warmup + steps):
        sync()
        began = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return times


def ours(config_dir: Path, batch, args) -> list:
    from omni_model.train.build import init_training_parallel
    from omni_model.train.loop import optimizer_step
    from omni_model.train.settings import TrainSettings
    from omni_model.train.talker_step import TalkerForwardStep, build_talker_training

    settings = TrainSettings(hf_dir=str(config_dir), init_checkpoint="", shards="", train_dir="",
                             train=dict(iters=1000, lr=1e-5, min_lr=1e-6, micro_batch_size=1, global_batch_size=1,
                                        moe_aux_loss_coeff=0.0, gpus_per_node=0 if args.cpu else 1))
    init_training_parallel(settings)
    training = build_talker_training(settings)
    forward_step = TalkerForwardStep(predictor_weight=1.0)
    weight = next(training.model.parameters())
    on_device = batch.to(weight.device)  # the thinker's states come in its training dtype (bf16 on a GPU)
    on_device.thinker_embeds = on_device.thinker_embeds.to(weight.dtype)
    on_device.thinker_hidden = on_device.thinker_hidden.to(weight.dtype)

    def step():
        optimizer_step(training.model, training.optimizer, training.scheduler, forward_step, iter([on_device]), 1,
                       seq_length=batch.labels.shape[1], micro_batch_size=batch.labels.shape[0])

    try:
        return timed(step, args.steps, args.warmup)
    finally:
        del training
        from omni_model.runtime.parallel import destroy_parallel

        destroy_parallel()


def hf(config: dict, batch, args) -> list:
    import torch.nn.functional as F
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeTalkerForConditionalGeneration

    dtype = torch.float32 if args.cpu else torch.bfloat16
    device = "cpu" if args.cpu else "cuda"
    talker_config = Qwen3OmniMoeConfig(**config).talker_config
    model = Qwen3OmniMoeTalkerForConditionalGeneration(talker_config).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=not args.cpu)
    b = batch.to(device)
    predictor = model.code_predictor
    groups = b.frame_codes.shape[1]

    def loss_fn():
        inputs = model.text_projection(b.thinker_embeds.to(dtype))
        inputs = inputs.masked_scatter(b.multimodal_mask[..., None].expand_as(inputs),
                                       model.hidden_projection(b.thinker_hidden.to(dtype)))
        embeddings = [model.get_input_embeddings()] + list(predictor.get_input_embeddings())
        for g in range(groups):
            present = (b.codec_codes[..., g] >= 0)[..., None]
            inputs = inputs + embeddings[g](b.codec_codes[..., g].clamp(min=0)) * present
        out = model.model(inputs_embeds=inputs, position_ids=b.position_ids, use_cache=False)
        hidden = out.last_hidden_state
        first = F.cross_entropy(model.codec_head(hidden).flatten(0, 1).float(), b.labels.flatten(), ignore_index=-100)
        rows = hidden.reshape(-1, hidden.shape[-1])[b.frame_positions]
        parts = [rows[:, None], model.get_input_embeddings()(b.frame_codes[:, :1])]
        parts += [predictor.get_input_embeddings()[g - 1](b.frame_codes[:, g:g + 1]) for g in range(1, groups - 1)]
        states = predictor.model(inputs_embeds=torch.cat(parts, 1), use_cache=False).last_hidden_state
        logits = torch.stack([predictor.lm_head[g - 1](states[:, g]) for g in range(1, groups)])
        residual = F.cross_entropy(logits.flatten(0, 1).float(), b.frame_codes[:, 1:].t().flatten())
        return first + residual

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return timed(step, args.steps, args.warmup)
    finally:
        del model, optimizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="talker MoE decoder layers (released: 20)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (default: by device name)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rows-to-run", default="ours,hf")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq, args.prompt = min(args.seq, 64), min(args.prompt, 16)

    from omni_model.train.metrics import peak_tflops

    config = model_config(args)
    batch = synthetic_batch(config, args.rows, args.seq, args.prompt)
    flops = model_flops(config, batch)
    peak = peak_tflops(args.peak_tflops)
    config_dir = Path(tempfile.mkdtemp(prefix="talker-bench-"))
    (config_dir / "config.json").write_text(json.dumps(config))
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    print(f"device {device}; talker {config['talker_config']['text_config']['num_hidden_layers']} layers; batch "
          f"{args.rows} x {args.seq} positions, {batch.frame_codes.shape[0]} frames; {flops / 1e12:.2f} TFLOP/step")
    results = []
    for name in args.rows_to_run.split(","):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            times = ours(config_dir, batch, args) if name == "ours" else hf(config, batch, args)
        except torch.OutOfMemoryError as error:
            results.append({"row": name, "error": f"out of memory: {error}"})
            continue
        median = statistics.median(times)
        tflops = flops / median / 1e12
        results.append({"row": name, "step_s": median, "positions_per_s": batch.labels.numel() / median,
                        "tflops": tflops, "mfu": tflops / peak if peak else None,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None})
    print(f"{'row':6} {'step s':>8} {'positions/s':>12} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['row']:6} {r['error'][:80]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        peak_gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['row']:6} {r['step_s']:8.3f} {r['positions_per_s']:12.0f} {r['tflops']:8.1f} {mfu:>6} {peak_gib:>9}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "args": vars(args) | {"json": str(args.json)},
                                         "rows": results}, indent=1))


if __name__ == "__main__":
    main()
