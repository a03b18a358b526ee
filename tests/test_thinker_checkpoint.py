"""The whole thinker through Megatron-Core dist-checkpointing (torch_dist): save, load into a fresh model, equal."""

from __future__ import annotations

import torch


def test_dist_checkpoint_roundtrip_is_bit_exact(tiny_hf_dir, tmp_path):
    from megatron.core import dist_checkpointing

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    source = build_thinker(tiny_hf_dir)
    load_hf_into_model(source, tiny_hf_dir, prefix="")
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(source.sharded_state_dict(), str(tmp_path / "ckpt"))

    target = build_thinker(tiny_hf_dir)  # randomly initialised
    loaded = dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path / "ckpt"))
    target.load_state_dict(loaded)

    expected, got = source.state_dict(), target.state_dict()
    tensors = [k for k, v in expected.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]
    assert any(".experts.linear_fc1.weight" in k for k in tensors)
    for key in tensors:
        assert torch.equal(expected[key], got[key]), key
