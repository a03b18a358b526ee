"""The performance switches of the model and its training step, as one typed object passed to the builders.

Each switch chooses between our faster code and the upstream code it stands in for (the seam of each one is
registered in omni_model.compat: `Seam.switch` names the field). The defaults are the production choice; a benchmark
or a test builds with other values to get upstream's own code as a same-run baseline:

    thinker = build_thinker(hf_dir, options=PerfOptions(plain_matmul_when_local=False))
    training = build_training(settings, options=PerfOptions(fold_grad_scale=False))

`apply_options(model, options)` sets them on an already built model (each module that has a switch implements
`use_options`); the builders call it, so a model always carries the options it was built with.
"""

from __future__ import annotations

import dataclasses

import torch

PACKED_KERNELS = ("auto", "loop")


@dataclasses.dataclass(frozen=True)
class PerfOptions:
    # mcore's Column/RowParallelLinear as a plain F.linear when its autograd Function would only multiply (linear.py)
    plain_matmul_when_local: bool = True
    # with it, at one TP rank, the bias mcore hands back to the caller (skip_bias_add) added inside the matmul
    # (linear.py _LocalMatmul.forward); False: mcore's (output, bias) for the caller to add
    bias_in_matmul: bool = True
    # packed attention: "auto" = torch's flash varlen kernel where it applies (CUDA, half precision), "loop" = one
    # SDPA call per sequence (attention.py)
    packed_kernel: str = "auto"
    # the fused vocab-parallel cross-entropy on the GPU; False: mcore's function (cross_entropy.py)
    fuse_ce_on_gpu: bool = True
    # 1/label-tokens and the clip factor folded into fused Adam's grad_scale (GPU; train/build.py FoldedGradScale)
    fold_grad_scale: bool = True
    # the allgather token dispatcher without host syncs when all experts are local (dispatcher.py)
    static_dispatch: bool = True
    # with it, each token's k expert slots summed by gathers (combine forward, dispatch backward) instead of mcore's
    # atomic scatter_add_ / index_add_ (dispatcher.py GatherCombineTokenDispatcher)
    gather_combine: bool = True
    # each step's first grad of a parameter copied into its fp32 main grad, no per-step zeroing of the grad buffers
    # (train/grad_buffer.py FirstWriteDDP); False: mcore's zero + add
    first_write_grads: bool = True
    # the vision tower's RoPE from cos/sin tables made once per forward, 4 kernels per query/key (encoder_layers.py
    # RotaryTables); False: mcore's apply_rotary_pos_emb in every layer (~12)
    tower_rope_tables: bool = True
    # the images and videos of a micro-batch through the vision tower in one forward, outputs split at the images'
    # merged-token count (thinker.py _visual_outputs); False: one forward each, as transformers does
    # (get_image_features / get_video_features)
    joint_visual_forward: bool = True
    # frozen towers (no tower parameter trained): the media of a training step's micro-batches through each tower in
    # ONE forward per group of STEP_TOWER_GROUP (2) micro-batches, each micro-batch then merging its share
    # (train/forward_step.py step_tower_outputs, thinker.py tower_outputs); False: the towers run in each micro-batch's forward, as mcore's
    # schedule calls the model once per micro-batch. Trained towers always run per micro-batch
    step_tower_forward: bool = True
    # with it, the next step's first group of micro-batches read and sent through the frozen towers after this step's
    # last backward is launched, before the optimizer's host reads: the host launches the towers' small kernels while
    # the GPU runs that backward, not while it idles at the next step's start (train/forward_step.py StepTowers;
    # not before a checkpoint or after the last step); False: each step runs its own towers at its start
    tower_lookahead: bool = True
    # the language model's RoPE from cos / signed-sin tables made once per forward, 4 kernels per query/key
    # (rope.RotaryTables, as tower_rope_tables does for the vision tower); False: mcore's apply_rotary_pos_emb in
    # every layer (~12 per query/key)
    llm_rope_tables: bool = True
    # on CUDA, RotaryTables applied by one Triton kernel each way (fused_kernels.rotary; the LLM's and the vision
    # tower's); False: their 4 torch kernels
    fused_rope: bool = True
    # on CUDA, the language model's (and talker's) RMSNorms as one Triton kernel each way (fused_kernels.rms_norm);
    # False: the torch ops of HF's RMSNorm (~7 kernels forward, ~10 backward, fp32 copies of the activations)
    fused_rms_norm: bool = True
    # on CUDA, the experts' silu(gate) * up * routing prob as one Triton kernel each way
    # (fused_kernels.swiglu_with_probs); False: experts.swiglu_with_probs' torch ops (4 forward, ~8 backward)
    fused_swiglu: bool = True

    def __post_init__(self):
        if self.packed_kernel not in PACKED_KERNELS:
            raise ValueError(f"packed_kernel {self.packed_kernel!r}: one of {PACKED_KERNELS}")


DEFAULT = PerfOptions()


def apply_options(model: torch.nn.Module, options: PerfOptions) -> torch.nn.Module:
    """Every module of `model` with a switch takes its value from `options`; returns the model."""
    for module in model.modules():
        use = getattr(module, "use_options", None)
        if use is not None:
            use(options)
    return model
