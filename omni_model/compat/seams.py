"""THE catalogue of omni_model's seams: every upstream patch, subclass, private attribute, internal we call and
performance switch, with where upstream has it, where we depend on it, why, and the versions it was verified on.
A new patch gets an entry here (and `python -m omni_model.compat --fingerprints` prints the fingerprint to record);
tests/test_compat.py holds every entry to the installed code.

The package imports no other omni_model module: our code is named by "module:qualname" strings and resolved when a
check runs, like upstream's, so that every module (runtime, model, train, data) can use the seam without an import
circle (tests/test_import_cycles.py).
"""

from __future__ import annotations

from .registry import Seam, resolve

# The stack every entry was verified on (torch: 2.13.0 on the CPU dev machines, 2.11 CUDA on the GPU machines).
# megatron-core 0.16.1 -> 0.19.2: every entry re-read against the new source (the te_general_gemm stub and the
# router's gating override are gone: mcore 0.19 defines te_general_gemm as None without TE and gates in torch).
MCORE, HF, ENERGON, DJ, TORCH = "megatron-core", "transformers", "megatron-energon", "py-data-juicer", "torch"
VERIFIED = {MCORE: ("0.19.2",), HF: ("5.25.0",), ENERGON: ("7.4.1",), DJ: ("1.6.1",), TORCH: ("2.13.0", "2.11")}

_TP = "megatron.core.tensor_parallel"
_MOE = "megatron.core.transformer.moe"
_OPT = "megatron.core.optimizer"
_SCHEDULES = "megatron.core.pipeline_parallel.schedules"
_HF_THINKER = "transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe"


def _seam(name, package, upstream, ours, kind, reason, check="source", fingerprint=None, switch=None) -> Seam:
    upstream = (upstream,) if isinstance(upstream, str) else tuple(upstream)
    return Seam(name, package, upstream, ours, kind, reason, VERIFIED[package], check, fingerprint, switch)


# -- behaviour checks (what a fingerprint cannot say) ------------------------------------------------------------

def _mcore_modules_bind_torch() -> None:
    """cpu_patches routes device='cuda' factories of these mcore modules to the CPU through their `torch` global."""
    import importlib

    import torch

    proxy_type = resolve("omni_model.runtime.cpu_patches:_TorchProxy")
    for name in resolve("omni_model.runtime.cpu_patches:_MCORE_MODULES"):
        bound = getattr(importlib.import_module(name), "torch", None)
        assert bound is torch or isinstance(bound, proxy_type), f"{name} no longer binds `torch` as a global"


def _mcore_binds_multi_tensor_fallbacks() -> None:
    """multi_tensor.apply rebinds `l2_norm_impl` / `multi_tensor_scale_impl` of mcore's optimizer modules."""
    for name in resolve("omni_model.runtime.multi_tensor:_MODULES"):
        module = resolve(name)
        assert hasattr(module, "multi_tensor_scale_impl"), f"{name}.multi_tensor_scale_impl is gone"
    assert hasattr(resolve("megatron.core.optimizer.clip_grads"), "l2_norm_impl"), "clip_grads.l2_norm_impl is gone"


def _hf_config_has_experts_implementation() -> None:
    """parity and the tests set `config._experts_implementation = 'eager'` (transformers' per-expert loop: its
    grouped_mm path is not deterministic on CPU); the attribute must exist and take that value."""
    from transformers import Qwen3OmniMoeTextConfig

    config = Qwen3OmniMoeTextConfig()
    assert hasattr(config, "_experts_implementation"), "PreTrainedConfig has no _experts_implementation"
    config._experts_implementation = "eager"
    assert config._experts_implementation == "eager", "_experts_implementation does not keep 'eager'"


def _torch_adam_reads_grad_scale() -> None:
    """FoldedGradScale sets `adam.grad_scale`: torch's Adam step must hand it to the fused kernel."""
    import inspect

    import torch

    assert 'getattr(self, "grad_scale", None)' in inspect.getsource(torch.optim.Adam.step), \
        "torch.optim.Adam.step no longer reads self.grad_scale"


def _dcp_metadata_merges() -> None:
    """convert.grouped_save merges part checkpoints: torch DCP's Metadata (state_dict_metadata, planner_data,
    storage_data), tensor entries' chunks, and the private _StorageInfo's relative_path (re-pointed at moved files)."""
    import dataclasses

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    fields = {f.name for f in dataclasses.fields(Metadata)}
    assert {"state_dict_metadata", "planner_data", "storage_data"} <= fields, f"Metadata fields are now {fields}"
    assert "chunks" in {f.name for f in dataclasses.fields(TensorStorageMetadata)}, "TensorStorageMetadata.chunks gone"
    assert "relative_path" in {f.name for f in dataclasses.fields(_StorageInfo)}, "_StorageInfo.relative_path gone"


def _dj_registry_gives_arguments() -> None:
    """config.OpCatalog takes the op names from Data-Juicer's OPERATORS registry (filled by load_ops) and each op's
    keyword arguments from the __init__ signatures down its MRO to base_op's classes, which take **kwargs."""
    import inspect

    from data_juicer.ops.base_op import OP, Filter

    registry = resolve("omni_model.data.dj_registry:registry")()
    assert len(registry) > 100, f"only {len(registry)} ops in Data-Juicer's registry"
    missing = {"min_len", "max_len", "text_key"} - set(registry.get("text_length_filter", ()))
    assert not missing, f"text_length_filter's arguments lack {sorted(missing)}"
    for base in (OP, Filter):
        kinds = {p.kind for p in inspect.signature(base.__init__).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD in kinds, f"{base.__name__}.__init__ no longer takes **kwargs"


def _dj_op_maps_in_process() -> None:
    """datajuicer.map_in_this_process: an op whose automatic parallelism is off and num_proc None hands None to its
    map (datasets maps in process only then; it forks a pool even for num_proc=1)."""
    from data_juicer.ops.base_op import OPERATORS

    op = OPERATORS.modules["text_length_filter"]()
    resolve("omni_model.data.datajuicer:map_in_this_process")(op)
    assert op.runtime_np() is None, f"runtime_np() is {op.runtime_np()!r} with num_proc None, parallelism off"


def _sources_read(*reads: tuple[str, str]):
    """A check that each upstream target's source still contains its text (an attribute name mcore reads)."""

    def check() -> None:
        import inspect

        for target, text in reads:
            assert text in inspect.getsource(resolve(target)), f"{target} no longer reads {text}"

    return check


def _energon_sample_fields() -> None:
    """The task encoder copies Energon's bookkeeping fields from the raw sample to the encoded one."""
    import dataclasses

    from megatron.energon import Sample

    names = {field.name for field in dataclasses.fields(Sample)}
    missing = {"__key__", "__restore_key__", "__subflavors__", "__sources__"} - names
    assert not missing, f"megatron.energon.Sample lost the fields {sorted(missing)}"


# -- the catalogue ------------------------------------------------------------------------------------------------

SEAMS: tuple[Seam, ...] = (
    # runtime/cpu_patches.py: megatron-core on a CPU-only torch with gloo (shared/notes/mcore-on-cpu.md)
    _seam("cpu.torch_cuda_api", TORCH,
          ["torch.cuda:current_device", "torch.cuda:current_stream", "torch.cuda:default_stream",
           "torch.cuda:synchronize", "torch.cuda:Stream", "torch.cuda:Event", "torch.cuda:stream",
           "torch.cuda:manual_seed", "torch.cuda:manual_seed_all", "torch:Tensor.cuda", "torch:Tensor.pin_memory"],
          "omni_model.runtime.cpu_patches:apply", "patch",
          "mcore calls these CUDA-only functions unconditionally; on a CPU-only torch they become CPU/no-op stand-ins",
          check="exists"),
    _seam("cpu.all_to_all_single", TORCH, "torch.distributed:all_to_all_single", "omni_model.runtime.cpu_patches:apply",
          "patch", "gloo rejects tensor split sizes; the wrapper passes lists with the same positional order",
          check="signature",
          fingerprint='(output, input, output_split_sizes, input_split_sizes, group, async_op)'),
    _seam("cpu.rng_state", MCORE, [f"{_TP}.random:_get_cuda_rng_state", f"{_TP}.random:_set_cuda_rng_state"],
          "omni_model.runtime.cpu_patches:apply", "patch",
          "mcore's RNG tracker saves/restores CUDA generator states: the CPU generator instead",
          fingerprint='22969191567649fe'),
    _seam("cpu.rng_tracker", MCORE,
          [f"{_TP}.random:CudaRNGStatesTracker.add", f"{_TP}.random:CudaRNGStatesTracker.fork"],
          "omni_model.runtime.cpu_patches:apply", "patch",
          "add() is rewritten for the CPU generator (same bookkeeping); fork()'s 'CPU RNG state changed' warning is "
          "filtered by its text",
          fingerprint='11dbcecb3581d644'),
    _seam("cpu.torch_factories", MCORE, [f"{_TP}.layers", f"{_OPT}.optimizer"],
          "omni_model.runtime.cpu_patches:_install_torch_proxy", "patch",
          "literal device='cuda' allocations in mcore modules go through their `torch` global, proxied on CPU",
          check=_mcore_modules_bind_torch),
    _seam("cpu.clip_grad_by_total_norm_fp32", MCORE, f"{_OPT}.clip_grads:clip_grad_by_total_norm_fp32",
          "omni_model.runtime.cpu_patches:apply", "patch",
          "asserts torch.cuda.FloatTensor grads: the same in-place scaling re-implemented for fp32 CPU grads (a "
          "tensor total norm, new in 0.19, compares the same way)",
          fingerprint='cf07b488fb76a8ae'),
    # runtime/multi_tensor.py
    _seam("mt.local_fallbacks", MCORE, ["megatron.core.utils:local_multi_tensor_l2_norm",
                                        "megatron.core.utils:local_multi_tensor_scale"],
          "omni_model.runtime.multi_tensor:apply", "patch",
          "the pure-Python fallbacks (a host sync per tensor) replaced by _foreach ops with the same contract",
          fingerprint='80b89b3c1f54d7a4'),
    _seam("mt.bindings", MCORE, [f"{_OPT}.clip_grads", f"{_OPT}.optimizer"], "omni_model.runtime.multi_tensor:apply",
          "private", "the module globals l2_norm_impl / multi_tensor_scale_impl that mcore binds its fallbacks to",
          check=_mcore_binds_multi_tensor_fallbacks),
    # model/
    _seam("model.router_aux_loss_tokens", MCORE, [f"{_MOE}.router:TopKRouter._apply_aux_loss",
                                                  f"{_MOE}.router:TopKRouter.attach_and_log_load_balancing_loss",
                                                  f"{_MOE}.moe_utils:get_tokens_per_expert_and_token_count"],
          "omni_model.model.router:OmniTopKRouter", "subclass",
          "_apply_aux_loss copied with valid_token_count = the TP x CP routed-token sum / tp_cp_size, which 0.19 "
          "multiplies back by tp_cp_size (its local count differs per rank when SP shards hold different padding)",
          fingerprint='86d0de381fad81e6'),
    _seam("model.static_dispatch", MCORE, [f"{_MOE}.token_dispatcher:MoEAllGatherTokenDispatcher.dispatch_postprocess",
                                           f"{_MOE}.moe_layer:MoELayer.__init__"],
          "omni_model.model.dispatcher:OmniMoELayer", "subclass",
          "the built dispatcher's __class__ is swapped to one whose dispatch_postprocess gives the same permutation "
          "without host syncs (all experts local)", switch="static_dispatch",
          fingerprint='54b6c02b0af4a541'),
    _seam("model.gather_combine", MCORE, [f"{_MOE}.token_dispatcher:MoEAllGatherTokenDispatcher.combine_preprocess",
                                          f"{_MOE}.moe_utils:unpermute"],
          "omni_model.model.dispatcher:GatherCombineTokenDispatcher", "subclass",
          "combine_preprocess replaced: each token's k slots summed by a gather (unpermute's scatter_add_ into zeros "
          "without probs, the allgather dispatcher's case when all experts are local)", switch="gather_combine",
          fingerprint='0dbfd47734d37100'),
    _seam("model.grouped_experts", MCORE,
          [f"{_MOE}.experts:TEGroupedMLP.__init__", f"{_MOE}.experts:TEGroupedMLP.forward"],
          "omni_model.model.experts:GroupedGemmExperts", "subclass",
          "TEGroupedMLP with torch grouped GEMMs for TE's GroupedLinear (0.19's grouped-linear builder protocol); "
          "its forward is copied minus a host sync, mcore's for the features it leaves out (fp8, op fuser, ...)",
          fingerprint='2df562c28073d6e4'),
    _seam("model.tower_rope_tables", MCORE, ["megatron.core.transformer.attention:SelfAttention."
                                             "get_query_key_value_tensors",
                                             "megatron.core.transformer.attention:Attention.forward"],
          "omni_model.model.rope:RotaryTableSelfAttention", "subclass",
          "the towers' attention applies RoPE tables to query and key as get_query_key_value_tensors returns them "
          "(split: no fused single-QKV RoPE) and hands mcore's forward rotary_pos_emb=None",
          switch="tower_rope_tables", fingerprint='a15e1f4daaa28368'),
    _seam("model.joint_visual_forward", HF, [f"{_HF_THINKER}:Qwen3OmniMoeThinkerModel.get_image_features",
                                             f"{_HF_THINKER}:Qwen3OmniMoeThinkerModel.get_video_features"],
          "omni_model.model.thinker:Qwen3OmniThinker._visual_outputs", "switch",
          "a micro-batch's images and videos go through the vision tower in one forward, split at the images' "
          "merged-token count; switched off, one forward each as transformers' thinker calls these two (pixel values "
          "in the tower's dtype, t*h*w // merge^2 rows per item), which the parity tests hold us to",
          switch="joint_visual_forward", fingerprint='277ac467330856f5'),
    _seam("model.grouped_gemm", TORCH, "torch:_grouped_mm", "omni_model.model.experts:grouped_gemm", "private",
          "torch's private grouped GEMM op (one launch for all local experts)", check="exists"),
    _seam("model.linear_forward_impl", MCORE, [f"{_TP}.layers:ColumnParallelLinear._forward_impl",
                                               f"{_TP}.layers:RowParallelLinear._forward_impl",
                                               f"{_TP}.layers:linear_with_grad_accumulation_and_async_allreduce"],
          "omni_model.model.linear:_LocalMatmul._forward_impl", "subclass",
          "_forward_impl is a plain F.linear when mcore's Function would only multiply (reads its keyword names; "
          "0.19's gtp_remat_size > 1 is not only a multiply)",
          switch="plain_matmul_when_local",
          fingerprint='bd58dc43ed965539'),
    _seam("model.linear_bias_fold", MCORE, [f"{_TP}.layers:ColumnParallelLinear.forward",
                                            f"{_TP}.layers:RowParallelLinear.forward"],
          "omni_model.model.linear:_LocalMatmul.forward", "subclass",
          "at one TP rank a skip_bias_add bias goes inside F.linear and None is returned: relies on forward doing "
          "nothing between the matmul and the caller's bias add there (identity copy / reduce at TP 1)",
          switch="bias_in_matmul", fingerprint='d5ecce38bc257508'),
    _seam("model.gpt_postprocess", MCORE, ["megatron.core.models.gpt.gpt_model:GPTModel._postprocess",
                                           "megatron.core.models.common.language_module.language_module:"
                                           "LanguageModule.compute_language_model_loss"],
          "omni_model.model.language_model:Qwen3OmniLanguageModel.forward", "call",
          "our forward runs the decoder itself (MRoPE, deepstack) and then GPTModel's private _postprocess by keyword; "
          "the loss hook it calls is overridden",
          fingerprint='0555ef23758e5d2f'),
    _seam("model.chunked_lm_loss", MCORE, ["megatron.core.models.gpt.gpt_model:GPTModel._postprocess",
                                           "megatron.core.tensor_parallel.layers:ColumnParallelLinear.forward"],
          "omni_model.model.language_model:Qwen3OmniLanguageModel._chunked_loss", "call",
          "train.loss_chunk_tokens: with labels, our forward does _postprocess's labels path itself one token chunk at "
          "a time (the output weight it picks, output_layer(hidden, weight=, runtime_gather_output=), "
          "compute_language_model_loss; no MTP, no inference) and relies on the output layer all-gathering an SP "
          "input along dim 0, rank-major (model.chunked_loss)",
          fingerprint='d0e4075c5d59c6c7'),
    _seam("model.cross_entropy", MCORE, f"{_TP}.cross_entropy:_VocabParallelCrossEntropy",
          "omni_model.model.cross_entropy:FusedVocabParallelCrossEntropy", "switch",
          "the same fp32 vocab-parallel cross-entropy fused on the GPU", switch="fuse_ce_on_gpu",
          fingerprint='ee9c3e36b0e76bac'),
    _seam("model.varlen_attention", TORCH, "torch.nn.attention.varlen:varlen_attn",
          "omni_model.model.attention:_varlen_attention", "switch",
          "torch's flash varlen kernel for packed sequences (keywords read from its signature per version)",
          check="exists", switch="packed_kernel"),
    _seam("model.encoder_process_groups", MCORE, "megatron.core.process_groups_config:ProcessGroupCollection.__init__",
          "omni_model.model.encoder_layers:encoder_process_groups", "private",
          "towers get a hand-filled ProcessGroupCollection: a size-1 TP group when replicated, a single-rank "
          "stand-in for CP",
          fingerprint='c0428f9efc971621'),
    _seam("model.param_attributes", MCORE, [f"{_TP}.layers:param_is_not_tensor_parallel_duplicate",
                                            "megatron.core.distributed.finalize_model_grads:"
                                            "_allreduce_non_tensor_model_parallel_grads",
                                            "megatron.core.distributed.param_and_grad_buffer:group_params_for_buffers"],
          "omni_model.model.encoder_layers:mark_replicated", "private",
          "parameter attributes we set and mcore reads: tensor_model_parallel (replicated towers), sequence_parallel "
          "(norm.RMSNorm), allreduce=False (experts.GroupedLinear: expert-DP grads)",
          check=_sources_read((f"{_TP}.layers:param_is_not_tensor_parallel_duplicate", "tensor_model_parallel"),
                              ("megatron.core.distributed.finalize_model_grads:"
                               "_allreduce_non_tensor_model_parallel_grads", '"sequence_parallel"'),
                              ("megatron.core.distributed.param_and_grad_buffer:group_params_for_buffers",
                               "'allreduce'"))),
    _seam("model.expert_sharded_state_dict", MCORE,
          ["megatron.core.transformer.utils:make_sharded_tensors_for_checkpoint",
           "megatron.core.dist_checkpointing.utils:replace_prefix_for_sharding"],
          "omni_model.model.experts:GroupedLinear.sharded_state_dict", "call",
          "the fused expert weight is written as TE's per-expert ShardedTensors with mcore's helpers",
          check="signature",
          fingerprint=('(state_dict, prefix, tensor_parallel_layers_axis_map, sharded_offsets, '
                       'extra_state_suffix, tp_group, dp_cp_group); (sharded_state_dict, old_prefix, new_prefix)')),
    _seam("model.float16_module_inputs", MCORE, "megatron.core.transformer.module:Float16Module.forward",
          "omni_model.train.forward_step:thinker_inputs", "private",
          "Float16Module casts only positional inputs to bf16: every input is passed by keyword so the float MRoPE "
          "positions stay exact",
          fingerprint='e7ae3115f23d3538'),
    _seam("model.rope_packed_rows", MCORE, "megatron.core.models.common.embeddings.rope_utils:apply_rotary_pos_emb",
          "omni_model.model.attention:per_token_rope_packing", "private",
          "packed rows handed over in 'sbhd' form with cu_seqlens set take RoPE token by token, not by mcore's THD "
          "loop",
          fingerprint='6ebc796813c1ef91'),
    _seam("model.gpt_model_init", MCORE, "megatron.core.models.gpt.gpt_model:GPTModel.__init__",
          "omni_model.model.language_model:Qwen3OmniLanguageModel", "subclass",
          "built with position_embedding_type='none' and scatter_embedding_sequence_parallel=False, then our MRoPE",
          check="signature",
          fingerprint=('(self, config, transformer_layer_spec, vocab_size, max_sequence_length, pre_process, '
                       'post_process, fp16_lm_cross_entropy, parallel_output, '
                       'share_embeddings_and_output_weights, position_embedding_type, rotary_percent, '
                       'rotary_base, rope_scaling, rope_scaling_factor, scatter_embedding_sequence_parallel, '
                       'seq_len_interpolation_factor, mtp_block_spec, pg_collection, vp_stage)')),
    # train/
    _seam("train.sharded_tensor_factory", MCORE, "megatron.core.dist_checkpointing.mapping:ShardedTensorFactory",
          "omni_model.train.checkpointing:_fused_experts_view", "private",
          "optimizer state of the fused experts maps to the per-expert checkpoint tensors through factories "
          "rebuilt with dataclasses.replace",
          fingerprint='0126aa8a306b731c'),
    _seam("train.aux_loss_scale", MCORE, f"{_MOE}.moe_utils:MoEAuxLossAutoScaler",
          "omni_model.train.forward_step:clear_moe_aux_loss_scale", "private",
          "the aux-loss backward scale lives in the class attribute main_loss_backward_scale, reset per forward",
          fingerprint='2eedb2e604cedee5'),
    _seam("train.per_token_loss", MCORE, ["megatron.core.pipeline_parallel.schedules:forward_step_calc_loss",
                                          "megatron.core.distributed.finalize_model_grads:finalize_model_grads"],
          "omni_model.train.forward_step:loss_func", "call",
          "the loss contract (token sums, divided by the global label-token count) as read in these functions",
          fingerprint='380b7e5902187a8e'),
    # context parallelism on our attention (model/context_parallel.py)
    _seam("model.cp_kv_all_gather", MCORE, f"{_TP}.mappings:gather_from_sequence_parallel_region",
          "omni_model.model.context_parallel:gather_keys_values", "call",
          "K/V all-gathered over the CP group (forward all-gather, backward reduce-scatter) by keyword `group`",
          check="signature", fingerprint='(input_, tensor_parallel_output_grad, group, output_split_sizes, use_global_buffer)'),
    _seam("model.cp_packed_seq_params", MCORE, "megatron.core.packed_seq_params:PackedSeqParams",
          "omni_model.model.context_parallel:ContextParallelPackedSeqParams", "subclass",
          "a dataclass subclass carries the CP plan (kv_index, local_index) to our attention through mcore's layers",
          fingerprint='0f07cb1af68de566'),
    _seam("model.cp_router_statistics", MCORE, [f"{_MOE}.router:TopKRouter._apply_aux_loss",
                                                f"{_MOE}.moe_utils:get_tokens_per_expert_and_token_count"],
          "omni_model.train.forward_step:context_parallel_inputs", "call",
          "the MoE aux loss of a CP-split micro-batch: routing statistics reduced over mcore's TP x CP group; "
          "OmniTopKRouter (model.router_aux_loss_tokens) weights it by their TP x CP sum on every rank",
          fingerprint='83d88edca16f9002'),
    _seam("train.cp_loss_reduction", MCORE, "megatron.core.parallel_state:get_data_parallel_group",
          "omni_model.train.loop:_reduced_loss", "call",
          "a CP rank's loss sums cover its chunks: logged losses are summed over DP x CP (with_context_parallel)",
          check="signature", fingerprint='(with_context_parallel, with_gtp_remat, partial_data_parallel)'),
    _seam("train.variable_seq_lengths", MCORE, "megatron.core.transformer.transformer_config:"
                                               "TransformerConfig.__post_init__",
          "omni_model.train.build:allow_variable_seq_lengths", "private",
          "variable_seq_lengths is set after __post_init__, whose allgather refusal does not apply at ep = 1",
          fingerprint='890da8cd8d15ec0a'),
    _seam("train.folded_grad_scale", MCORE, [f"{_OPT}.optimizer:MixedPrecisionOptimizer.step",
                                             "megatron.core.distributed.distributed_data_parallel:"
                                             "DistributedDataParallel.scale_gradients"],
          "omni_model.train.build:FoldedGradScale", "patch",
          "the DDP model's scale_gradients and the optimizer's step are replaced on the instances: the two grad "
          "scalings go into fused Adam's grad_scale", switch="fold_grad_scale",
          fingerprint='2e9ad364fc5f29ab'),
    _seam("train.ddp_nan_check_off", MCORE,
          "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync",
          "omni_model.train.build:FoldedGradScale", "private",
          "the fold's step refuses a non-finite grad norm, so it turns DDP's per-bucket NaN check off on the model's "
          "ddp_config, which every bucket group shares and reads at each grad sync",
          check=_sources_read(("megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup."
                               "start_grad_sync", "self.ddp_config.check_for_nan_in_grad")),
          switch="fold_grad_scale"),
    _seam("train.first_write_grads", MCORE, ["megatron.core.distributed.distributed_data_parallel:"
                                             "DistributedDataParallel._make_backward_post_hook",
                                             "megatron.core.distributed.distributed_data_parallel:"
                                             "DistributedDataParallel.zero_grad_buffer",
                                             "megatron.core.distributed.distributed_data_parallel:"
                                             "DistributedDataParallel.finish_grad_sync"],
          "omni_model.train.grad_buffer:FirstWriteDDP", "subclass",
          "the backward hook is wrapped to copy a parameter's first grad of a step into main_grad, zero_grad_buffer "
          "keeps mcore's resets without zeroing the buffers, finish_grad_sync zeroes the main grads no hook wrote",
          switch="first_write_grads", fingerprint='14c801ac7ffcb732'),
    _seam("train.step_tower_forward", MCORE, [f"{_SCHEDULES}:forward_backward_no_pipelining",
                                              f"{_SCHEDULES}:forward_backward_pipelining_without_interleaving"],
          "omni_model.train.forward_step:step_tower_outputs", "switch",
          "mcore's schedules call the model, towers included, once per micro-batch, each forward_step reading the next "
          "item of the data iterator; with frozen towers the step reads its num_microbatches batches first, runs each "
          "tower once over all their media and hands the schedule an iterator of (batch, its tower outputs): relies "
          "on the schedule reading exactly num_microbatches items, in micro-batch order; switched off, the towers run "
          "in every micro-batch's forward as the schedule calls it",
          switch="step_tower_forward", fingerprint='bf8cd460e6c34c84'),
    _seam("train.tower_lookahead", MCORE, [f"{_SCHEDULES}:forward_backward_no_pipelining",
                                           "megatron.core.distributed.finalize_model_grads:finalize_model_grads"],
          "omni_model.train.forward_step:StepTowers", "call",
          "optimizer_step reads the next step's first micro-batches from the data iterator right after the schedule "
          "(which read exactly num_microbatches) and launches their frozen towers there: relies on the schedule and "
          "finalize_model_grads returning with the step's backward still queued on the GPU (no host read or "
          "synchronize of their own), so the towers' launches overlap it; the next step's schedule takes those items "
          "first", switch="tower_lookahead", fingerprint='9be63de1de07ec7c'),
    _seam("model.llm_rope_tables", MCORE, ["megatron.core.transformer.attention:SelfAttention."
                                           "get_query_key_value_tensors",
                                           "megatron.core.transformer.attention:Attention.forward",
                                           "megatron.core.transformer.transformer_block:TransformerBlock.forward"],
          "omni_model.model.language_model:Qwen3OmniLanguageModel._layers_rotary", "subclass",
          "the language model hands its layers RotaryTables as rotary_pos_emb (the block passes it on untouched unless "
          "it checkpoints whole layers: not with full recompute); its attention applies them to query and key after "
          "the query / key norms and gives mcore's forward rotary_pos_emb=None", switch="llm_rope_tables",
          fingerprint='92b6892c191434e1'),
    _seam("model.fused_rope", MCORE, "megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_bshd",
          "omni_model.model.fused_kernels:rotary", "switch",
          "mcore's unfused rotate-half RoPE (cos and sin cast to the input dtype, t*cos + rotate_half(t)*sin, each "
          "product rounded): the Triton kernel keeps those roundings", switch="fused_rope",
          fingerprint='4a54b66e47ae8722'),
    _seam("model.fused_rms_norm", HF, f"{_HF_THINKER}:Qwen3OmniMoeThinkerTextRMSNorm.forward",
          "omni_model.model.fused_kernels:rms_norm", "switch",
          "the RMSNorm's numerics are HF's (fp32 normalisation, cast to the input dtype, times the weight); on CUDA one "
          "Triton kernel each way computes them", switch="fused_rms_norm", fingerprint='d676bfe9af0e524d'),
    _seam("model.fused_swiglu", MCORE, f"{_MOE}.experts:TEGroupedMLP.forward",
          "omni_model.model.fused_kernels:swiglu_with_probs", "switch",
          "TEGroupedMLP applies the routing probs inside its activation (silu(gate) * up * prob, rows [gate | up]); "
          "on CUDA one Triton kernel each way computes it", switch="fused_swiglu", fingerprint='3bc6de697f024255'),
    _seam("train.moe_metrics_reset", MCORE, "megatron.core.transformer.moe.moe_logging:destroy_moe_metrics_tracker",
          "omni_model.train.build:wrap_for_training", "call",
          "mcore's process-global MoE metrics tracker is sized by the first model that records: each built training "
          "starts a fresh one", fingerprint='cc8def07fee1bb81'),
    _seam("train.adam_grad_scale", TORCH, "torch.optim:Adam.step", "omni_model.train.build:FoldedGradScale", "private",
          "torch's Adam hands `self.grad_scale` to the fused kernel", check=_torch_adam_reads_grad_scale),
    _seam("train.distrib_optimizer_load", MCORE, [f"{_OPT}.distrib_optimizer:DistributedOptimizer."
                                                  "_set_main_param_and_optimizer_states",
                                                  f"{_OPT}.distrib_optimizer:DistributedOptimizer."
                                                  "_init_optimizer_states_with_dummy_values"],
          "omni_model.train.checkpointing:_prepare_distributed_optimizer_load", "patch",
          "the per-parameter state copy is wrapped to leave Adam's `step` alone; the private initialiser is called "
          "before a load",
          fingerprint='a508e0a6c2b8d227'),
    _seam("convert.dcp_metadata_merge", TORCH, ["torch.distributed.checkpoint.filesystem:_StorageInfo",
                                                "torch.distributed.checkpoint.filesystem:FileSystemWriter.finish"],
          "omni_model.convert.grouped_save:merge_parts", "private",
          "convert saves one save group per dist_checkpointing.save (mcore and DCP have no incremental save) and "
          "merges the parts' DCP metadata into one .metadata, written by FileSystemWriter.finish",
          check=_dcp_metadata_merges),
    _seam("convert.common_state_object", MCORE, ["megatron.core.dist_checkpointing.serialization:save",
                                                 "megatron.core.dist_checkpointing.serialization:load_common_state_dict"],
          "omni_model.convert.grouped_save:merge_parts", "private",
          "each part keeps its common state as mcore's ShardedObject('common_state', (1,), (0,)) inside the DCP "
          "checkpoint (0.16: a common.pt beside it); the merge keeps part 0's after checking the others equal",
          fingerprint='073fa29f624b4e9e'),
    # transformers (the parity reference)
    _seam("hf.experts_implementation", HF, "transformers.configuration_utils:PreTrainedConfig",
          "omni_model.convert.parity:reference_thinker", "private",
          "the private config attribute _experts_implementation = 'eager' (deterministic per-expert loop on CPU)",
          check=_hf_config_has_experts_implementation),
    # megatron-energon
    _seam("energon.preparator", ENERGON,
          "megatron.energon.flavors.webdataset.prepare:WebdatasetPreparator.prepare_dataset",
          "omni_model.data.shards:prepare_energon", "call",
          "Energon's internal preparator writes the index and split.yaml without its interactive CLI",
          check="signature",
          fingerprint=('(cls, parent_path, paths, *, split_parts_ratio, split_parts_patterns, split_config, '
                       'shuffle_seed, progress_fn, workers, tar_index_only, media_filter, fix_duplicates, '
                       'index_sqlite_tmp_path)')),
    _seam("energon.sample_fields", ENERGON, "megatron.energon:Sample", "omni_model.data.task_encoder:OmniTaskEncoder",
          "private", "the encoded sample carries the raw sample's __restore_key__/__subflavors__/__sources__ "
          "(savable loader state, subflavours)", check=_energon_sample_fields),
    # py-data-juicer
    _seam("dj.ray_executor", DJ, ["data_juicer.core.executor.ray_executor:RayExecutor.__init__",
                                  "data_juicer.core.data.ray_dataset:RayDataset.process",
                                  "data_juicer.core.data.ray_dataset:filter_batch"],
          "omni_model.data.ray_executor:RayRecipeDataset", "private",
          "the executor's datasetbuilder and RayDataset's per-op process / filter_batch are driven one op at a time",
          fingerprint='609391a10cbf68a2'),
    _seam("dj.init_configs", DJ, ["data_juicer.config:init_configs", "data_juicer.utils.constant:RAY_JOB_ENV_VAR"],
          "omni_model.data.datajuicer:run_recipe", "private",
          "init_configs sets RAY_JOB_ENV_VAR process-wide and redirects the streams: both are put back",
          check="exists"),
    _seam("dj.op_registry", DJ, ["data_juicer.ops.base_op:OPERATORS", "data_juicer.ops:load_ops"],
          "omni_model.config:OpCatalog", "private",
          "plan-time recipe checks read op names from Data-Juicer's registry and arguments from the ops' signatures "
          "(data/dj_registry.py, cached per version)",
          check=_dj_registry_gives_arguments),
    _seam("dj.op_in_process", DJ, "data_juicer.ops.base_op:OP.runtime_np",
          "omni_model.data.datajuicer:map_in_this_process", "private",
          "np 1 maps in process: op.auto_op_parallelism off and op.num_proc None (datasets forks for num_proc=1)",
          check=_dj_op_maps_in_process),
    _seam("dj.base_op_kwargs", DJ, ["data_juicer.ops.base_op:OP.__init__", "data_juicer.ops.base_op:Filter.__init__"],
          "omni_model.data.dj_registry:base_kwargs", "source-parse",
          "the keyword arguments every op accepts are read from base_op.py's kwargs.get calls",
          fingerprint='94ce36fe7a41a934'),
    _seam("dj.dedup_ops", DJ, ["data_juicer.ops.base_op:Deduplicator",
                               "data_juicer.ops.deduplicator.document_minhash_deduplicator:"
                               "DocumentMinhashDeduplicator.compute_hash",
                               "data_juicer.ops.deduplicator.document_minhash_deduplicator:"
                               "DocumentMinhashDeduplicator.process"],
          "omni_model.data.dj_ops:OmniMinhashMediaDeduplicator", "subclass",
          "media-aware deduplicators extend the MinHash deduplicator's hash and decision",
          fingerprint='231287b97c40a8d1'),
)

BY_NAME = {seam.name: seam for seam in SEAMS}
