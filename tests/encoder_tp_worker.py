"""torchrun worker of test_encoders_tp2_torchrun: TP=2 encoders (gloo, CPU, fp32) vs transformers.

Each rank loads its TP shard through the production Mapper (tp_rank/tp_size), runs forward + backward, and checks
  * outputs (replicated on both ranks) == HF outputs,
  * each gradient shard == HF gradient mapped through the rows and split like the weight.
Audio runs twice: TP-split (tiny: 2 heads -> 1 per rank) and replicated (`replicate=True`, size-1 TP groups).
"""

from __future__ import annotations

import sys

import torch

torch.set_num_threads(1)


def main(hf_dir: str, ckpt_root: str) -> None:
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    init_parallel(tp=2)
    from megatron.core import parallel_state as ps

    from encoder_parity_utils import (
        audio_inputs,
        hf_audio_reference,
        hf_config_dict,
        hf_grads_as_mcore,
        hf_vision_reference,
        load_hf_encoder_tensors,
        load_tower,
        sharpen,
        vision_inputs,
    )
    from omni_model.model.audio import AudioEncoder
    from omni_model.model.vision import VisionEncoder

    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    assert tp == 2
    cfg = hf_config_dict(hf_dir)
    tensors = sharpen(load_hf_encoder_tensors(hf_dir))
    report = []
    dbg = lambda *a: print(f"[rank{rank}]", *a, flush=True) if "-v" in sys.argv else None
    dbg("start")

    def check_grads(ours, ref, hf_prefix, mcore_prefix, audio_tp, shard_rank, shard_size):
        expect = {k[len(mcore_prefix):]: v for k, v in
                  hf_grads_as_mcore(ref, hf_prefix, cfg, shard_rank, shard_size, audio_tp).items()
                  if k.startswith(mcore_prefix)}
        worst = 0.0
        for name, p in ours.named_parameters():
            e = expect[name]
            assert p.grad is not None and p.grad.shape == e.shape, (name, p.shape, e.shape)
            worst = max(worst, (p.grad - e).abs().max().item() / (e.abs().max().item() + 1e-6))
        return worst

    # ---- vision
    ours = VisionEncoder(cfg)
    dbg("vision built")
    assert ours.decoder.layers[0].self_attention.linear_qkv.weight.shape[0] == 3 * 32 // 2
    load_tower(ours, tensors, cfg, "vision_model.", tp_rank=rank, tp_size=tp)
    ref = hf_vision_reference(hf_dir, tensors)
    pixels, grid = vision_inputs([[2, 6, 8], [1, 4, 6]], seed=5)
    out = ref(pixels, grid)
    dbg("hf vision fwd")
    embeds, deepstack = ours(pixels, grid)
    dbg("vision fwd")
    g = torch.Generator().manual_seed(11)
    w = [torch.randn(embeds.shape, generator=g) for _ in range(4)]
    sum((a * b).sum() for a, b in zip(w, [out.pooler_output, *out.deepstack_features])).backward()
    sum((a * b).sum() for a, b in zip(w, [embeds, *deepstack])).backward()
    err = max((a - b).abs().max().item() for a, b in
              zip([embeds, *deepstack], [out.pooler_output, *out.deepstack_features]))
    gerr = check_grads(ours, ref, "thinker.visual.", "vision_model.", True, rank, tp)
    report.append(f"vision tp2 rank{rank}: out err {err:.2e}, grad rel err {gerr:.2e}")
    assert err < 1e-4 and gerr < 1e-4, report[-1]

    # ---- audio, TP-split and replicated
    lens = [1730, 45, 237]
    feats, flens = audio_inputs(lens, seed=6)
    ref_a = hf_audio_reference(hf_dir, tensors)
    out_a = ref_a.forward(feats, flens).last_hidden_state
    wa = torch.randn(out_a.shape, generator=g)
    (wa * out_a).sum().backward()
    for replicate in (False, True):
        ours_a = AudioEncoder(cfg, replicate=replicate)
        dbg("audio built", replicate)
        load_tower(ours_a, tensors, cfg, "audio_model.", tp_rank=rank, tp_size=tp, audio_tp=not replicate)
        got = ours_a(feats, flens)
        (wa * got).sum().backward()
        err = (got - out_a).abs().max().item()
        gerr = check_grads(ours_a, ref_a, "thinker.audio_tower.", "audio_model.", not replicate, rank, tp)
        report.append(f"audio tp2 {'replicated' if replicate else 'split'} rank{rank}: out err {err:.2e}, "
                      f"grad rel err {gerr:.2e}")
        assert err < 1e-4 and gerr < 1e-4, report[-1]

    # ---- dist_checkpointing: save the TP=2 towers, load into fresh (differently initialised) ones
    from megatron.core import dist_checkpointing

    ckpt = ckpt_root + "/encoders"
    towers = {"vision_model.": ours, "audio_model.": ours_a}  # ours_a: the replicated audio tower
    if rank == 0:
        import os

        os.makedirs(ckpt, exist_ok=True)
    torch.distributed.barrier()
    sharded = {}
    for prefix, m in towers.items():
        sharded.update(m.sharded_state_dict(prefix=prefix))
    dist_checkpointing.save(sharded, ckpt)
    torch.distributed.barrier()
    fresh = {"vision_model.": VisionEncoder(cfg), "audio_model.": AudioEncoder(cfg, replicate=True)}
    target = {}
    for prefix, m in fresh.items():
        target.update(m.sharded_state_dict(prefix=prefix))
    loaded = dist_checkpointing.load(target, ckpt)
    for prefix, m in fresh.items():
        m.load_state_dict({k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}, strict=False)
        for (n, a), b in zip(towers[prefix].named_parameters(), m.parameters()):
            assert torch.equal(a, b), (prefix, n)
    report.append(f"dist_checkpointing TP2 save/load rank{rank}: towers bit-identical")

    for line in report:
        print(line, flush=True)
    torch.distributed.barrier()
    if rank == 0:
        print("TP2 OK", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
