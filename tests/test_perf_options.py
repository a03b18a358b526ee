"""The performance switches as one typed object (model.options.PerfOptions): the builders hand each field to the
modules it governs, so a benchmark or a test sets fields instead of module globals."""

from __future__ import annotations

import warnings

import pytest

from llm_helpers import config_of

warnings.filterwarnings("ignore")


def _switches(thinker) -> dict:
    """What each switch-carrying module of a built thinker runs with."""
    from omni_model.model.attention import PackedKernelChoice
    from omni_model.model.dispatcher import GatherCombineTokenDispatcher, OmniMoELayer, StaticAllGatherTokenDispatcher
    from omni_model.model.experts import GroupedGemmExperts
    from omni_model.model.linear import _LocalMatmul
    from omni_model.model.norm import RMSNorm

    modules = list(thinker.modules())
    return {
        "plain_matmul_when_local": {m.plain_matmul for m in modules if isinstance(m, _LocalMatmul)},
        "bias_in_matmul": {m.bias_in_matmul for m in modules if isinstance(m, _LocalMatmul)},
        "packed_kernel": {m.packed_kernel for m in modules if isinstance(m, PackedKernelChoice)},
        "fuse_ce_on_gpu": {thinker.language_model.fuse_ce_on_gpu},
        "static_dispatch": {isinstance(m.token_dispatcher, StaticAllGatherTokenDispatcher)
                            for m in modules if isinstance(m, OmniMoELayer)},
        "gather_combine": {type(m.token_dispatcher) is GatherCombineTokenDispatcher
                           for m in modules if isinstance(m, OmniMoELayer)},
        "tower_rope_tables": {thinker.vision_model.rope_tables},
        "joint_visual_forward": {thinker.joint_visual_forward},
        "step_tower_forward": {thinker.step_tower_forward},
        "tower_lookahead": {thinker.tower_lookahead},
        "llm_rope_tables": {thinker.language_model.rope_tables},
        "fused_rope": {thinker.language_model.fused_rope, thinker.vision_model.fused_rope},
        "fused_rms_norm": {m.fused for m in modules if isinstance(m, RMSNorm)},
        "fused_swiglu": {m.fused_swiglu for m in modules if isinstance(m, GroupedGemmExperts)},
    }


def test_build_thinker_hands_every_field_to_its_modules(tiny_hf_dir):
    from omni_model.model.options import PerfOptions, apply_options
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    mcores = PerfOptions(plain_matmul_when_local=False, bias_in_matmul=False, packed_kernel="loop",
                         fuse_ce_on_gpu=False, static_dispatch=False, tower_rope_tables=False, gather_combine=False,
                         joint_visual_forward=False, step_tower_forward=False, tower_lookahead=False,
                         fused_rms_norm=False, fused_swiglu=False, llm_rope_tables=False, fused_rope=False)
    thinker = build_thinker(config_of(tiny_hf_dir), perform_initialization=False, options=mcores)
    assert _switches(thinker) == {"plain_matmul_when_local": {False}, "bias_in_matmul": {False},
                                  "packed_kernel": {"loop"}, "fuse_ce_on_gpu": {False}, "static_dispatch": {False},
                                  "gather_combine": {False}, "tower_rope_tables": {False},
                                  "joint_visual_forward": {False}, "step_tower_forward": {False},
                                  "tower_lookahead": {False}, "fused_rms_norm": {False}, "fused_swiglu": {False},
                                  "llm_rope_tables": {False}, "fused_rope": {False}}
    # the towers' linears and attention are reached too, not only the LLM's
    assert sum(1 for name, _ in thinker.named_modules() if name.startswith(("vision_model", "audio_model"))
               and hasattr(_, "use_options")) > 4
    apply_options(thinker, PerfOptions())
    assert _switches(thinker) == {"plain_matmul_when_local": {True}, "bias_in_matmul": {True},
                                  "packed_kernel": {"auto"}, "fuse_ce_on_gpu": {True}, "static_dispatch": {True},
                                  "gather_combine": {True}, "tower_rope_tables": {True},
                                  "joint_visual_forward": {True}, "step_tower_forward": {True},
                                  "tower_lookahead": {True}, "fused_rms_norm": {True}, "fused_swiglu": {True},
                                  "llm_rope_tables": {True}, "fused_rope": {True}}
    # each dispatcher switch on its own: the static dispatcher with mcore's combine
    apply_options(thinker, PerfOptions(gather_combine=False))
    assert _switches(thinker)["static_dispatch"] == {True} and _switches(thinker)["gather_combine"] == {False}


def test_an_unknown_packed_kernel_is_refused():
    from omni_model.model.options import PerfOptions

    with pytest.raises(ValueError, match="packed_kernel 'flash': one of"):
        PerfOptions(packed_kernel="flash")
