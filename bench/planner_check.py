"""Memory planner vs measured peak memory: reduced-depth 30B-A3B thinkers (real widths, real towers, real vocab) on one
GPU, 3 training steps each through omni_model.train's own build + step code (bf16, mcore DDP, distributed optimizer,
get_forward_backward_func with our forward_step), at several settings (layers, seq_len, recompute, frozen towers).

    python bench/planner_check.py                    # GPU (one H200): table + bench/results/planner_check.json
    python bench/planner_check.py --cpu --tiny       # CPU smoke run of the same code on the tiny model (fp32)

Each setting runs in its own process (clean allocator statistics; an OOM loses one row, not the run). Per setting it
prints the planner's `allocated` estimate (omni_model.plan, with the batch's real image/audio token counts) next to
`torch.cuda.max_memory_allocated`, and the measured static parts (parameter, DDP grad-buffer and optimizer-state
bytes, counted from the tensors) next to the planner's. On CPU only those tensor-byte counts are compared (no
allocator peak to read; RSS says nothing exact).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_SETTINGS = [
    # layers, seq_len, recompute, frozen towers
    dict(layers=3, seq_len=2048, recompute="none", freeze_towers=False),
    dict(layers=4, seq_len=2048, recompute="none", freeze_towers=False),
    dict(layers=4, seq_len=4096, recompute="none", freeze_towers=False),
    dict(layers=4, seq_len=4096, recompute="full", freeze_towers=False),
    dict(layers=4, seq_len=4096, recompute="none", freeze_towers=True),
    dict(layers=4, seq_len=4096, recompute="full", freeze_towers=True),
    dict(layers=4, seq_len=4096, recompute="selective", freeze_towers=True),
    # train.lora (rank 8 on the LLM attention + experts): the base frozen in bf16, adapters' grads + optimizer only
    dict(layers=4, seq_len=4096, recompute="full", freeze_towers=True, lora=8),
    dict(layers=4, seq_len=4096, recompute="selective", freeze_towers=True, lora=8),
]
CPU_SETTINGS = [
    dict(layers=4, seq_len=512, recompute="none", freeze_towers=False),
    dict(layers=4, seq_len=512, recompute="none", freeze_towers=True),
    dict(layers=4, seq_len=512, recompute="full", freeze_towers=True),
    dict(layers=4, seq_len=512, recompute="none", freeze_towers=True, lora=8),
]
STEPS = 3


# --cpu --tiny: the tiny model with a wider MoE LLM (still small enough for a CPU), so that the layers' activations
# and not only the 152k-vocab logits show in the autograd-saved bytes
CPU_TEXT = {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
            "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 128, "intermediate_size": 128}


def model_config(tiny: bool, layers: int) -> dict:
    from omni_model.configs import released_30b_a3b_config, tiny_config

    config = tiny_config() if tiny else released_30b_a3b_config()
    text = config["thinker_config"]["text_config"]
    text["num_hidden_layers"] = layers
    if tiny:
        text.update(CPU_TEXT)
        text["rope_parameters"]["mrope_section"] = [8, 4, 4]  # head_dim 32: 16 rotary frequencies
        config["thinker_config"]["vision_config"]["out_hidden_size"] = CPU_TEXT["hidden_size"]
        config["thinker_config"]["audio_config"]["output_dim"] = CPU_TEXT["hidden_size"]
    return config


def synthetic_batch(hf_config: dict, seq_len: int, audio_model):
    """One micro-batch [1, seq_len]: an image block (seq/4 image tokens, real patch rows), an audio block (~seq/8
    audio tokens from real-size mel features) and random text; every text token trained."""
    import torch

    from omni_model.configs import TOKEN_IDS
    from omni_model.data.batch import OmniBatch

    vision = hf_config["thinker_config"]["vision_config"]
    merge = vision["spatial_merge_size"]
    # image: grid (1, 2g, 2g/...) patches; image tokens = patches / merge^2
    image_tokens = seq_len // 4
    side = 1
    while (side * 2) ** 2 <= image_tokens:
        side *= 2
    grid = (1, side * merge, image_tokens // side * merge)
    image_tokens = grid[1] * grid[2] // merge ** 2
    patch_dim = vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    pixel_values = torch.randn(grid[1] * grid[2], patch_dim)
    # audio: the largest frame count whose encoder output fits in seq/8 tokens
    frames = 100
    while int(audio_model.output_lengths(torch.tensor([frames + 100]))) <= seq_len // 8:
        frames += 100
    audio_tokens = int(audio_model.output_lengths(torch.tensor([frames])))
    input_features = torch.randn(1, hf_config["thinker_config"]["audio_config"]["num_mel_bins"], frames)

    text = seq_len - image_tokens - audio_tokens - 4
    ids = ([TOKEN_IDS["vision_start"]] + [TOKEN_IDS["image_pad"]] * image_tokens + [TOKEN_IDS["vision_end"]]
           + [TOKEN_IDS["audio_start"]] + [TOKEN_IDS["audio_pad"]] * audio_tokens + [TOKEN_IDS["audio_end"]]
           + torch.randint(0, 151000, (text,)).tolist())
    input_ids = torch.tensor([ids])
    labels = torch.full_like(input_ids, -100)
    labels[0, -text:] = input_ids[0, -text:]
    shift = torch.full_like(labels, -100)
    shift[0, :-1] = labels[0, 1:]
    batch = OmniBatch(
        input_ids=input_ids, labels=labels, shift_labels=shift, loss_mask=(shift != -100).float(),
        attention_mask=torch.ones_like(input_ids), position_ids=torch.arange(seq_len).float().view(1, 1, -1).expand(
            3, 1, -1).contiguous(),
        pixel_values=pixel_values, image_grid_thw=torch.tensor([grid]), input_features=input_features,
        feature_attention_mask=torch.ones(1, frames, dtype=torch.long), audio_feature_lengths=torch.tensor([frames]),
        num_tokens=seq_len, num_trained=int((shift != -100).sum()))
    return batch, image_tokens, audio_tokens


def init_weights(thinker) -> None:
    """Small random weights (the build leaves them uninitialised: a checkpoint fills them in training)."""
    import torch

    with torch.no_grad():
        for name, param in thinker.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name or name.endswith("ln_q.weight") else 0.0)
            else:
                param.normal_(0.0, 0.02)


def tensor_bytes(training) -> dict:
    """Bytes held by the parameters, the DDP grad buffers and the optimizer states, counted from the tensors."""
    import torch

    ddp = training.model
    params = sum(p.numel() * p.element_size() for p in training.thinker.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers + ddp.expert_parallel_buffers)
    optimizer = 0
    for opt in getattr(training.optimizer, "chained_optimizers", [training.optimizer]):
        for state in opt.optimizer.state.values():
            optimizer += sum(t.numel() * t.element_size() for k, t in state.items() if k != "step" and torch.is_tensor(t))
        for group in getattr(opt, "shard_fp32_from_float16_groups", []) or []:  # distributed optimizer's master copy
            optimizer += sum(p.numel() * p.element_size() for p in group)
        for group in getattr(opt, "fp32_from_float16_groups", []) or []:  # plain mixed-precision master copy
            optimizer += sum(p.numel() * p.element_size() for p in group)
    return {"weights": params, "grads": grads, "optimizer": optimizer}


import torch  # noqa: E402  (after sys.path; the bench needs it anyway)


class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward during the forward (parameters excluded; the
    recompute inside backward not counted): the measured counterpart of the planner's activations + towers + the
    saved fp32 softmax of the logits."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages = {}

    def pack(self, tensor):
        if torch._C._current_graph_task_id() != -1:  # inside backward (recompute): freed again layer by layer
            return tensor
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params and storage.device.type != "meta":
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def run_one(setting: dict, cpu: bool, tiny: bool) -> dict:
    """One setting in this process: build, 3 steps, measure; the planner's estimate for the same run."""
    import torch

    torch.set_num_threads(1 if cpu else torch.get_num_threads())
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from omni_model.plan import GIB, Layout, Workload, estimate
    from omni_model.train.build import build_training, init_training_parallel
    from omni_model.train.forward_step import forward_step
    from omni_model.train.settings import TrainSettings

    hf_config = model_config(tiny, setting["layers"])
    hf_dir = Path(tempfile.mkdtemp(prefix="planner_check_"))
    (hf_dir / "config.json").write_text(json.dumps(hf_config))
    frozen = setting["freeze_towers"]
    train = {"iters": STEPS, "lr_warmup_iters": 1, "global_batch_size": 1, "micro_batch_size": 1,
             "seq_len": setting["seq_len"], "recompute": setting["recompute"], "freeze_vision": frozen,
             "freeze_audio": frozen, "gpus_per_node": 0 if cpu else 1, "cpu_procs": 1}
    rank = setting.get("lora", 0)
    if rank:  # towers without adapters: frozen (freeze_towers is the row's label)
        train.update(freeze_vision=False, freeze_audio=False, lora={"enabled": True, "rank": rank, "alpha": 2 * rank})
    settings = TrainSettings(hf_dir=str(hf_dir), init_checkpoint="", shards="", train_dir=str(hf_dir), train=train)
    init_training_parallel(settings)
    # LoRA: no base checkpoint to load (init_weights fills every weight next)
    training = build_training(settings, load_initial_weights=False, load_base=lambda thinker: None)
    init_weights(training.thinker)
    # the mixed-precision / distributed optimizer copied the (uninitialised) bf16 weights into its fp32 masters
    training.optimizer.reload_model_params()
    batch, image_tokens, audio_tokens = synthetic_batch(hf_config, setting["seq_len"], training.thinker.audio_model)

    forward_backward = get_forward_backward_func()
    training.model.train()
    if not cpu:
        torch.cuda.synchronize()
    began, losses = time.perf_counter(), []
    saved = SavedTensorBytes(training.model)
    for step in range(STEPS):  # the training loop's step (omni_model.train.loop.train)
        training.model.zero_grad_buffer()
        training.optimizer.zero_grad()
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if step == 0 else nullcontext()
        with hooks:
            reports = forward_backward(forward_step_func=forward_step, data_iterator=iter([batch]),
                                       model=[training.model], num_microbatches=1, seq_length=setting["seq_len"],
                                       micro_batch_size=1, forward_only=False)
        training.optimizer.step()
        training.scheduler.step(increment=1)
        report = reports[0]["lm loss"]
        losses.append(float(report[0] / report[1]))
    if not cpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / STEPS

    measured = tensor_bytes(training)
    layout = Layout(distributed_optimizer=not cpu)
    work = Workload(seq_len=setting["seq_len"], recompute=setting["recompute"], freeze_vision=frozen,
                    freeze_audio=frozen, image_tokens=image_tokens, audio_tokens=audio_tokens, bf16=not cpu,
                    lora_rank=rank, lora_targets=("attention", "experts") if rank else ())
    est = estimate(hf_config, layout, work)
    row = {**setting, "image_tokens": image_tokens, "audio_tokens": audio_tokens, "losses": losses,
           "step_s": seconds, "estimate_parts_gib": {k: v / GIB for k, v in est.parts.items()},
           "estimate_allocated_gib": est.allocated / GIB, "estimate_total_gib": est.total / GIB,
           "measured_tensors_gib": {k: v / GIB for k, v in measured.items()},
           "static_match": {k: measured[k] == est.parts[k] for k in measured},
           # autograd's saved tensors vs the planner's activations + towers + saved fp32 softmax (4 B per logit)
           "saved_bytes_gib": saved.total / GIB,
           "estimate_saved_gib": (est.parts["activations"] + est.parts.get("towers", 0)
                                  + setting["seq_len"] * hf_config["thinker_config"]["text_config"]["vocab_size"] * 4)
           / GIB}
    row["saved_error"] = row["estimate_saved_gib"] / max(row["saved_bytes_gib"], 1e-12) - 1
    # the same without the logits' fp32 softmax (one [seq, vocab] tensor): the layers' and towers' share alone
    logits = setting["seq_len"] * hf_config["thinker_config"]["text_config"]["vocab_size"] * 4 / GIB
    row["saved_layers_error"] = (row["estimate_saved_gib"] - logits) / max(row["saved_bytes_gib"] - logits, 1e-12) - 1
    if not cpu:
        row["measured_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        row["error"] = row["estimate_allocated_gib"] / row["measured_peak_gib"] - 1
    return row


def print_table(rows: list) -> None:
    header = (f"{'layers':>6} {'seq':>5} {'recompute':>9} {'towers':>7} {'img/aud tok':>11} | {'estimate':>9} "
              f"{'measured':>9} {'error':>7} | autograd-saved vs estimate | static parts planner == tensors")
    print(header)
    for r in rows:
        if "failed" in r:
            print(f"{r['layers']:>6} {r['seq_len']:>5} {r['recompute']:>9} {'frozen' if r['freeze_towers'] else 'train':>7}"
                  f" FAILED: {r['failed'][-300:]}")
            continue
        peak = r.get("measured_peak_gib")
        towers = f"lora{r['lora']}" if r.get("lora") else ("frozen" if r["freeze_towers"] else "train")
        print(f"{r['layers']:>6} {r['seq_len']:>5} {r['recompute']:>9} {towers:>7} "
              f"{r['image_tokens']:>5}/{r['audio_tokens']:<5} | {r['estimate_allocated_gib']:>7.2f}G "
              + (f"{peak:>7.2f}G {100 * r['error']:>+6.1f}%" if peak is not None else f"{'-':>9} {'-':>7}")
              + f" | saved {r['saved_bytes_gib']:.3f}G est {r['estimate_saved_gib']:.3f}G "
              f"({100 * r['saved_error']:+.1f}%; w/o logits {100 * r['saved_layers_error']:+.1f}%) | "
              f"{r['static_match']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (fp32, plain optimizer, gloo)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of the 30B widths")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting (JSON) in this process
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "planner_check.json"))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per setting")
    parser.add_argument("--only", help="comma-separated setting indexes (e.g. 0,1,2) to run; rows of earlier runs in "
                        "--out are kept, so a long table can be measured in several commands")
    args = parser.parse_args()
    if args.one:
        if args.cpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        row = run_one(json.loads(args.one), args.cpu, args.tiny)
        print("RESULT " + json.dumps(row), flush=True)
        return 0

    settings = CPU_SETTINGS if args.cpu else GPU_SETTINGS
    if args.only:
        settings = [settings[int(i)] for i in args.only.split(",")]
    rows = []
    for setting in settings:
        cmd = [sys.executable, __file__, "--one", json.dumps(setting)] + (["--cpu"] if args.cpu else []) \
            + (["--tiny"] if args.tiny else [])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        if args.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=REPO)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(found[-1][7:]) if found else {**setting, "failed": (proc.stderr or proc.stdout)[-3000:]}
        except subprocess.TimeoutExpired:
            row = {**setting, "failed": f"timeout after {args.timeout} s"}
        rows.append(row)
        print_table([row])
        gc.collect()
    out = Path(args.out)
    if out.exists():  # keep the rows of other settings measured before (same device and model)
        key = lambda r: (r["layers"], r["seq_len"], r["recompute"], r["freeze_towers"], r.get("lora", 0))  # noqa: E731
        mine = {key(r) for r in rows}
        rows = [r for r in json.loads(out.read_text())["rows"] if key(r) not in mine] + rows
    print()
    print_table(rows)
    ok = [r for r in rows if "error" in r]
    if ok:
        worst = max(ok, key=lambda r: abs(r["error"]))
        print(f"worst |estimate/measured - 1| = {100 * abs(worst['error']):.1f}% (target 15%)")
    out.parent.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else __import__("torch").cuda.get_device_name(0)
    out.write_text(json.dumps({"device": device, "model": "tiny" if args.tiny else "30B-A3B widths", "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
