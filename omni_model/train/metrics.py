"""What a training step reports: loss, lr, grad norm, MoE aux loss, real tokens/s, model TFLOP/s and MFU, memory —
printed as a step line with ETA (plus a live bar on an interactive terminal), appended to `metrics.jsonl` and written
as TensorBoard scalars under `tb/` (rank 0).

Model FLOPs (`FlopCounter`) count the matrix products of what a step computes for its real tokens and media, as
multiply-accumulates x 2 (forward) and x 3 of that when the part trains (forward + input and weight gradients):

* LLM: the active parameters (routed experts: top-k of them; the output layer; not the embedding lookup) per real
  token, plus causal attention (QK^T and AV over L^2 / 2 positions) per layer for every conversation of length L.
  A frozen LLM still passes gradients to trainable towers below it: forward + input gradients (x 2 of forward).
* vision tower (per image / video of grid t x h x w, N = t h w patches): the patch embedding, every layer's
  qkv/proj/MLP on the N patches plus attention inside each temporal patch (t segments of h w patches), the merger
  and the deepstack mergers on the N / merge^2 merged tokens.
* audio tower (per clip of F mel frames): the three stride-2 3x3 convolutions and conv_out on every 2 n_window-frame
  chunk (its valid frames: the padding a partial chunk is convolved with is not counted), every layer on the clip's
  output tokens plus attention inside its windows, proj1 and proj2.
  A frozen tower runs forward only.

Norms, activations, the softmax and element-wise work are not counted; recompute is not counted (model FLOPs, not
hardware FLOPs). MFU = TFLOP/s per device / peak TFLOP/s per device; the peak is train.peak_tflops, else looked up by
device name, else unknown (CPU): MFU is then null.

The MoE aux loss is mcore's own tracking (`track_moe_metrics`, as Megatron's training loop logs it): per MoE layer
the load-balancing loss without its coefficient, averaged over the step's micro-batches and the data-parallel ranks,
then averaged over the MoE layers (uniform routing gives 1; the summed-over-layers value is this x the number of MoE
layers).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch

# dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, without sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0, "GB200": 2500.0}


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured:
        return float(configured)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def _encoder_layer_macs(tokens: int, d: int, f: int) -> int:
    """qkv (3 d^2), proj (d^2), fc1 + fc2 (2 d f) of one pre-LN encoder layer over `tokens` positions."""
    return tokens * (4 * d * d + 2 * d * f)


class FlopCounter:
    """Model FLOPs of a step's batches, per part: `counter(seen)` with the TokenCounter's counts (seq_lens,
    vision_grids, audio_frames) -> {"llm": ..., "vision": ..., "audio": ...}."""

    def __init__(self, hf_config, train=None):
        """`train`: the train section (TrainConfig or mapping; None = the schema's defaults)."""
        from omni_model.model.language_model import count_parameters
        from omni_model.model.transformer_config import audio_config_of, text_config_of, thinker_config_of

        from omni_model.schema import TrainConfig

        train = TrainConfig.of(train)
        text = text_config_of(hf_config)
        thinker = thinker_config_of(hf_config)
        self.vision = thinker.get("vision_config")
        self.audio = audio_config_of(hf_config) if "audio_config" in thinker else None
        self.active = count_parameters(text, include_embeddings=False)["active"]
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        self.llm_attention_width = text["num_hidden_layers"] * text["num_attention_heads"] * head_dim
        # FLOPs per multiply-accumulate: forward 2; + input gradients 2; + weight gradients 2
        self.llm_factor = 4 if train.freeze_llm else 6
        self.vision_factor = 2 if train.freeze_vision else 6
        self.audio_factor = 2 if train.freeze_audio else 6
        if train.lora.enabled:  # the base gets no weight gradients; a tower is backpropagated only for its adapters
            targets = set(train.lora.targets)  # the adapters' own rank-r products are left out (< 1 % at r 16)
            self.llm_factor = 4
            self.vision_factor = 4 if "vision" in targets else 2
            self.audio_factor = 4 if "audio" in targets else 2

    def __call__(self, seen: dict) -> dict:
        return {"llm": self.llm(seen["seq_lens"]), "vision": self.vision_flops(seen.get("vision_grids", [])),
                "audio": self.audio_flops(seen.get("audio_frames", []))}

    def llm(self, seq_lens: list) -> float:
        linear = self.llm_factor * self.active * sum(seq_lens)
        # causal attention: QK^T and AV over L^2 / 2 positions each; their backward is twice the forward either way
        attention = 6 * self.llm_attention_width * sum(length * length for length in seq_lens)
        return float(linear + attention)

    def vision_macs(self, grid: tuple) -> int:
        """Multiply-accumulates of the vision tower for one image / video of grid (t, h, w) patches."""
        v = self.vision
        t, h, w = (int(x) for x in grid)
        d, f, merge = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"]
        patches = t * h * w
        patch_dim = v.get("in_channels", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2
        merged_dim = d * merge * merge
        mergers = 1 + len(v.get("deepstack_visual_indexes") or ())
        return (patches * patch_dim * d
                + v["depth"] * (_encoder_layer_macs(patches, d, f) + 2 * t * (h * w) ** 2 * d)
                + mergers * patches // (merge * merge) * (merged_dim * merged_dim + merged_dim * v["out_hidden_size"]))

    def vision_flops(self, grids: list) -> float:
        if not self.vision:
            return 0.0
        return float(self.vision_factor * sum(self.vision_macs(grid) for grid in grids))

    def audio_macs(self, frames: int) -> int:
        """Multiply-accumulates of the audio tower for one clip of `frames` mel frames."""
        from omni_model.model.audio_lengths import audio_output_lengths, conv_out_length

        a = self.audio
        d, f, ds, mel = a["d_model"], a["encoder_ffn_dim"], a["downsample_hidden_size"], a["num_mel_bins"]
        chunk = 2 * a["n_window"]
        full, rest = divmod(int(frames), chunk)
        freq1, freq2, freq3 = (conv_out_length(mel, k) for k in (1, 2, 3))
        macs, tokens = 0, 0
        for length in [chunk] * full + ([rest] if rest else []):
            t1, t2, t3 = (conv_out_length(length, k) for k in (1, 2, 3))
            macs += 9 * ds * freq1 * t1 + 9 * ds * ds * (freq2 * t2 + freq3 * t3) + t3 * ds * freq3 * d
            tokens += t3
        window = int(audio_output_lengths(chunk, a["n_window"])) * (a["n_window_infer"] // chunk)
        full_windows, last = divmod(tokens, window)
        attention = 2 * d * (full_windows * window * window + last * last)
        return (macs + a["encoder_layers"] * (_encoder_layer_macs(tokens, d, f) + attention)
                + tokens * (d * d + d * a["output_dim"]))

    def audio_flops(self, clips: list) -> float:
        if not self.audio:
            return 0.0
        return float(self.audio_factor * sum(self.audio_macs(frames) for frames in clips))


def moe_aux_loss(config, num_microbatches: int) -> Optional[float]:
    """The step's MoE load-balancing loss as mcore tracks it (module docstring), None when the model has no aux loss.
    A collective over the pipeline, TP x CP and DP groups: every rank calls it once per step (it also clears mcore's
    tracker for the next step)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, track_moe_metrics

    name = "load_balancing_loss"
    if not config.num_moe_experts or not config.moe_aux_loss_coeff or config.moe_router_load_balancing_type != "aux_loss":
        return None
    tracker = get_moe_layer_wise_logging_tracker()
    if name not in tracker:  # a stage without MoE layers still takes part in the reduction over the pipeline
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        tracker[name] = {"values": torch.zeros(config.num_layers, device=device), "reduce_group": None,
                         "avg_group": None, "reduce_group_has_dp": False}
    totals: dict = {}
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=totals, track_names=[name],
                      num_layers=config.num_layers, moe_layer_freq=config.moe_layer_freq)
    return float(totals[name])


def memory_gib() -> float:
    """Peak memory of this process: GPU allocator peak, or the resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Rank 0's sink: metrics.jsonl (one JSON object per step / evaluation) + TensorBoard + the step lines on stdout
    + a live progress bar with ETA when the run's console is a terminal (runtime.logs.Progress)."""

    def __init__(self, metrics_path: Path, tb_dir: Path, total_iters: int, start_iter: int, enabled: bool = True,
                 name: str = "finetune"):
        self.enabled, self.name = enabled, name
        self.total, self.start = total_iters, start_iter
        self.started = time.monotonic()
        self.path = Path(metrics_path)
        self.tb = self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            from omni_model.runtime.logs import Progress

            # purge_step: a resumed run drops the events a killed run wrote after its last checkpoint
            self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=start_iter + 1)
            # log=None: the step lines below are the log's progress lines
            self.bar = Progress(total_iters, "steps", initial=start_iter, label=name)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as sink:
            sink.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and value is not None and math.isfinite(value):
                self.tb.add_scalar(f"train/{key}" if not key.startswith("eval") else key.replace("_", "/", 1),
                                   value, step)
        self.tb.flush()
        self.bar.update(1, loss=f"{record['loss']:.4f}")

    def progress(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        done = step - self.start
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total - step) if done else 0.0
        parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}",
                 f"grad-norm {record['grad_norm']:.3f}" if record.get("grad_norm") is not None else "grad-norm -"]
        if record.get("moe_aux_loss") is not None:
            parts.append(f"aux {record['moe_aux_loss']:.4f}")
        towers = record.get("flops_vision", 0) + record.get("flops_audio", 0)
        total = towers + record.get("flops_llm", 0)
        parts += [f"{record['tokens_per_s']:.0f} tok/s",
                  f"{record['tflops']:.2f} TFLOP/s" + (f" (towers {100 * towers / total:.0f}%)" if total else "")]
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if record.get("skipped_samples"):
            parts.append(f"{record['skipped_samples']} skipped")
        parts.append(f"mem {record['mem_gib']:.2f} GiB")
        parts.append(f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}")
        print(f"[{self.name}] " + " | ".join(parts), flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
