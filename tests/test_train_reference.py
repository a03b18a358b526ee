"""Our training step is transformers' training step (CPU, fp32, tiny Qwen3-Omni).

* `test_training_matches_transformers`: STEPS optimizer steps of 2 micro-batches each, through our step (the finetune
  stage's `build_training`: mcore DDP, `get_megatron_optimizer` Adam with decoupled weight decay and its standard
  no-decay group, `OptimizerParamScheduler`; then `get_forward_backward_func` with `forward_step`,
  `finalize_model_grads`, gradient clipping, in the training loop's order) and through a plain PyTorch loop on transformers'
  `Qwen3OmniMoeThinkerForConditionalGeneration` (`torch.optim.AdamW`, `clip_grad_norm_`, the LR schedule by its
  formula written out here). Same samples: packed THD rows on our side; transformers' attention cannot honour packing
  boundaries on CPU, so it gets the same samples as padded rows, and its token losses are summed and divided by the
  step's label-token count (the token mean over the global batch, our loss). MoE aux loss coefficient 0 on both
  sides (its value is compared in the second test). A parameter that a step does not use (a tower on a step without
  its media) still takes its Adam step in mcore (its grad buffer holds zeros: the moments decay and move it, weight
  decay applies), while torch's optimizers skip a parameter whose .grad is None: the plain loop keeps zero gradients
  instead of None (`zero_grad(set_to_none=False)`, zeros before the first step), mcore's convention. Per-step losses
  agree to LOSS_TOL, final weights (every tensor, HF names, through the mapping) to WEIGHT_TOL relative, and every
  tensor with a gradient moves (TRAIN says why Adam's eps is 1e-6).
* `test_aux_loss_matches_transformers`: see its docstring.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from llm_helpers import hf_thinker
from train_helpers import scheduled_lr, switch_stats, to_hf_names, train_step

STEPS = 10
# adam_eps 1e-6, not 1e-8: Adam's update is lr * m / (sqrt(v) + eps) per element, so an element whose gradient is
# ~0 but for fp32 rounding (e.g. an attention key bias: softmax ignores it, its true gradient is 0) moves by up to
# lr on rounding noise alone when eps is far below that noise. With 1e-8 that noise, different on another CPU,
# grew to 9.4e-5 in the loss at step 6 and 2.2e-4 in the weights (an AMD EPYC box; 1.1e-5 on the box these
# tolerances were first measured on); with 1e-6 the same box gives 4.8e-6 and 1.1e-5. Both models get the same eps.
TRAIN = dict(lr=2e-3, min_lr=2e-4, lr_warmup_iters=2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
             adam_eps=1e-6, clip_grad=1.0)
# the token-mean loss (~11): agrees to ~1e-6 at most steps; step 6 (the two spoken-answer samples of the demo, whose
# text the thinker trains on, with demo-0000/0001) is a steep one (grad norm 13.8 where the others are 1.4-2.3): 4.8e-6
LOSS_TOL = 2e-5
# every final weight, relative to its norm: 1.1e-5 at most (measured)
WEIGHT_TOL = 1e-4
# tensors whose true gradient is 0, which training may leave unchanged: the audio tower's attention key biases (a
# key bias adds q.b to every score of a query's row, which softmax ignores)
GRADIENT_FREE = re.compile(r"audio_tower\.layers\.\d+\.self_attn\.k_proj\.bias")


def lr_at(step: int) -> float:
    """The LR of 0-based step `step`: the schedule written out (train_helpers.scheduled_lr)."""
    return scheduled_lr(step + 1, dict(TRAIN, iters=STEPS))


@pytest.fixture(scope="module")
def samples(tiny_hf_dir, tmp_path_factory):
    """Every demo conversation the encoder takes with at most 200 tokens (media of every kind), in demo order: the
    deliberately bad ones it takes too (the data stages drop them, but the model must train on them like
    transformers; the spoken-answer ones are text to the thinker). With them, step 6 is the first step without audio:
    the audio tower's parameters have no gradient there (see the module docstring: they caused a 3.4e-4 step-7
    difference while the reference loop skipped them)."""
    from omni_model.data.demo import generate_demo
    from omni_model.data.encoder import OmniEncoder, media_from_paths
    from omni_model.data.formats import load_raw

    records, _, _ = load_raw(generate_demo(tmp_path_factory.mktemp("demo"), 24, seed=5))
    encoder = OmniEncoder(tiny_hf_dir, max_seq_len=2048)
    out = []
    for record in records:
        try:
            sample = encoder.encode(record, media_from_paths(record))
        except Exception:  # noqa: BLE001 - the demo's deliberately broken samples
            continue
        if sample.length <= 200 and (sample.labels != -100).sum() > 2:
            out.append(sample)
    return out, encoder.pad_id


def _micro_batches(samples, pad_id, step):
    """Two micro-batches of two conversations each: (ours: one packed row each, transformers: padded rows)."""
    from omni_model.data.batch import collate
    from omni_model.data.packing import pack

    pool, n = samples, len(samples)
    pairs = [[pool[(4 * step + 2 * m + j) % n] for j in range(2)] for m in range(2)]
    ours = [collate([pack(pair)], pad_id=pad_id, packed=True) for pair in pairs]
    theirs = [collate(pair, pad_id=pad_id, packed=False) for pair in pairs]
    return ours, theirs


def _ours(hf_dir, train_dir):
    """The finetune stage's own training objects (omni_model.train.build: layout + micro-batch calculator, thinker,
    DDP, get_megatron_optimizer, OptimizerParamScheduler), with the tiny HF weights loaded through the mapping."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.train.build import build_training, init_training_parallel
    from omni_model.train.settings import TrainSettings

    settings = TrainSettings(
        hf_dir=str(hf_dir), init_checkpoint="", shards="", train_dir=str(train_dir),
        train=dict(TRAIN, iters=STEPS, lr_decay_style="cosine", micro_batch_size=1, global_batch_size=2,
                   moe_aux_loss_coeff=0.0, seed=1234))
    init_training_parallel(settings)
    assert get_num_microbatches() == 2
    training = build_training(settings, load_initial_weights=False)
    load_hf_into_model(training.thinker, hf_dir, prefix="")
    return training.model, training.optimizer, training.scheduler


def _transformers(hf_dir):
    model = hf_thinker(hf_dir).train()
    model.config.text_config.output_router_logits = False
    params = dict(model.named_parameters())
    # mcore's standard groups: no weight decay on 1-d parameters (norms, biases)
    groups = [{"params": [p for p in params.values() if p.ndim > 1], "weight_decay": TRAIN["weight_decay"]},
              {"params": [p for p in params.values() if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(TRAIN["adam_beta1"], TRAIN["adam_beta2"]),
                                  eps=TRAIN["adam_eps"])
    for param in params.values():  # mcore's grad buffers: an unused parameter's gradient is 0, not None
        param.grad = torch.zeros_like(param)
    return model, optimizer


def _transformers_step(model, optimizer, batches, step) -> float:
    n_tokens = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        inputs = batch.hf_inputs()
        labels = inputs.pop("labels")
        logits = model(**inputs, use_cache=False).logits
        token_losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum")
        (token_losses / n_tokens).backward()
        total += token_losses.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip_grad"])
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # zeros, not None: mcore's optimizer steps every parameter
    return total / n_tokens


def _hf_weights(model, out_dir) -> dict:
    """transformers' thinker parameters under the on-disk HF names: saved by transformers itself (which turns its
    in-memory layout, e.g. fused experts, back into the checkpoint format) and read back."""
    from safetensors.torch import load_file

    model.save_pretrained(out_dir)
    tensors = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        tensors.update({f"thinker.{name}": t for name, t in load_file(path).items()})
    return tensors


def test_training_matches_transformers(tiny_hf_dir, samples, tmp_path):
    from omni_model.convert.mapping import current_coord

    pool, pad_id = samples
    assert {"bad-corrupt_speech", "bad-speech_too_long"} <= {s.sample_ids[0] for s in pool}  # a step without audio
    ours, optimizer, scheduler = _ours(tiny_hf_dir, tmp_path / "train")
    ref, ref_optimizer = _transformers(tiny_hf_dir)
    initial = {k: v.clone() for k, v in to_hf_names({current_coord(): ours.module.state_dict()}, tiny_hf_dir).items()}
    losses, worst_loss = [], 0.0
    for step in range(STEPS):
        our_batches, their_batches = _micro_batches(pool, pad_id, step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step), rel=1e-12, abs=1e-15)
        result = train_step(ours, optimizer, scheduler, our_batches)
        their_loss = _transformers_step(ref, ref_optimizer, their_batches, step)
        losses.append((result["loss"], their_loss))
        worst_loss = max(worst_loss, abs(result["loss"] - their_loss))
        print(f"step {step}: lr {lr_at(step):.2e} loss ours {result['loss']:.7f} transformers {their_loss:.7f} "
              f"diff {abs(result['loss'] - their_loss):.1e} ({result['num_tokens']} label tokens)")
    assert losses[-1][0] < losses[0][0]  # it trains

    final = to_hf_names({current_coord(): ours.module.state_dict()}, tiny_hf_dir)
    reference = _hf_weights(ref, tmp_path / "transformers")
    assert set(final) == set(reference), sorted(set(final) ^ set(reference))[:5]
    worst_name, worst, moved = None, 0.0, 0
    for name, weight in final.items():
        expected = reference[name]
        error = ((weight - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        moved += not torch.equal(weight, initial[name]) or bool(GRADIENT_FREE.fullmatch(name.removeprefix("thinker.")))
        if error >= worst:
            worst_name, worst = name, error
    print(f"per-step loss max abs diff {worst_loss:.1e}; final weights worst relative error {worst:.1e} "
          f"({worst_name}); {moved}/{len(final)} tensors changed by training")
    assert worst_loss <= LOSS_TOL
    assert worst <= WEIGHT_TOL, worst_name
    assert moved == len(final), [n for n, w in final.items() if torch.equal(w, initial[n])]


def test_aux_loss_matches_transformers(tiny_hf_dir, samples):
    """Our MoE aux loss vs transformers' `load_balancing_loss_func`, on the same router logits.

    Ours (mcore's `switch_load_balancing_loss_func`, `moe_router_load_balancing_type='aux_loss'`) is computed PER MoE
    LAYER over the micro-batch's non-padding tokens, normalised by top_k, and each layer's term is added to the loss
    with the coefficient:  L_aux = coeff * sum_l E * sum_i f_li * P_li,  f_li = c_li / (k T), P_li = mean_t p_lti.
    transformers pools the statistics of ALL layers before multiplying, without the 1/k:
    L_hf = coeff * E * sum_i (sum_l c_li / (L T)) * (sum_m P_mi / L), i.e. (k / L^2) * sum_{l,m} E sum_i f_li P_mi.

    So (1) for one layer, transformers' value is exactly k times ours; (2) with several layers transformers adds
    cross-layer products (layer l's token counts times layer m's probabilities). Ours is the Switch/GShard
    definition: every router is balanced on its own. Under the pooled form one layer's overload on expert i can be
    offset by another layer's underload of i (the product of the pooled statistics is minimised without any single
    layer being balanced), and its gradient pushes layer m's router by the imbalance of the other layers. The 1/k
    makes uniform routing cost 1 per layer for any top-k. Consequence for users: the same `router_aux_loss_coef`
    weighs the aux loss differently (uniform routing costs coeff * L with us, coeff * k with transformers).
    Both exclude padding (ours through the padding mask, transformers through the attention mask).
    """
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.data.batch import collate
    from omni_model.model.thinker import build_thinker
    from omni_model.model.transformer_config import text_config_of
    from omni_model.runtime.parallel import init_parallel
    from omni_model.train.forward_step import thinker_inputs
    from train_helpers import aux_losses

    pool, pad_id = samples
    batch = collate([pool[0], pool[3]], pad_id=pad_id, packed=False)  # different lengths: the shorter is padded
    assert (batch.attention_mask == 0).any()
    init_parallel(seed=1234)
    thinker = build_thinker(tiny_hf_dir, config_overrides={"moe_aux_loss_coeff": 1.0})
    load_hf_into_model(thinker, tiny_hf_dir, prefix="")
    thinker.train()
    routers = [layer.mlp.router for layer in thinker.language_model.decoder.layers]
    logits = []
    for router in routers:  # record every router's logits [S, B, E] -> [B*S, E] rows in batch order like HF
        def gating(hidden, _gating=router.gating):
            out = _gating(hidden)
            logits.append(out.detach().transpose(0, 1).reshape(-1, out.shape[-1]))
            return out
        router.gating = gating
    aux_losses()
    thinker(**thinker_inputs(batch))
    ours = aux_losses()["load_balancing_loss"]  # per layer, as mcore computed it (divided by the coefficient)

    text = text_config_of(tiny_hf_dir)
    num_experts, k, num_layers = text["num_experts"], text["num_experts_per_tok"], len(routers)
    keep = batch.attention_mask.reshape(-1).bool()
    f, p = (torch.stack(s) for s in zip(*[switch_stats(layer_logits, keep, k) for layer_logits in logits]))
    switch = num_experts * (f * p).sum(-1)  # per layer: the Switch form of the docstring
    pooled = k / num_layers ** 2 * num_experts * (f.sum(0) * p.sum(0)).sum()  # transformers' form, written out
    per_layer_hf = torch.stack([load_balancing_loss_func((layer_logits,), num_experts, k, batch.attention_mask)
                                for layer_logits in logits])
    pooled_hf = load_balancing_loss_func(tuple(logits), num_experts, k, batch.attention_mask)

    ref = hf_thinker(tiny_hf_dir).train()
    with torch.no_grad():
        out = ref(**{k_: v for k_, v in batch.hf_inputs().items() if k_ != "labels"}, output_router_logits=True,
                  use_cache=False)
    print(f"aux per layer: mcore {ours.tolist()}, Switch formula {switch.tolist()}, transformers one layer / k "
          f"{(per_layer_hf / k).tolist()}; all {num_layers} layers: transformers {pooled_hf.item():.6f} (its own "
          f"forward {out.aux_loss.item():.6f}, pooled formula {pooled.item():.6f}) vs k * our layer mean "
          f"{(k * ours.mean()).item():.6f}")
    torch.testing.assert_close(ours, switch, rtol=1e-6, atol=0)  # mcore computes the Switch form, padding excluded
    torch.testing.assert_close(per_layer_hf, k * ours, rtol=1e-6, atol=0)  # one layer: transformers = k * ours
    torch.testing.assert_close(out.aux_loss, pooled_hf, rtol=1e-5, atol=0)  # its router logits are ours
    torch.testing.assert_close(pooled_hf, pooled, rtol=1e-6, atol=0)  # its all-layer value is the pooled form
    assert abs(pooled_hf - k * ours.mean()) > 1e-3  # which is not the per-layer losses: cross-layer terms
