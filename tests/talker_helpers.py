"""Shared helpers of the talker tests (also imported by tests/dist/talker_parallel_parity.py): synthetic talker
inputs shaped as `Qwen3OmniMoeForConditionalGeneration.generate` builds them, and transformers' talker as the
reference, called through its own modules and forwards."""

from __future__ import annotations

import torch

from llm_helpers import text_batch
from omni_model.train.talker_step import IGNORE, TalkerBatch


def talker_batch(config: dict, b: int = 2, s: int = 16, seed: int = 0, frames_from: int = 10) -> TalkerBatch:
    """A batch in `generate`'s layout: a prompt (text and multimodal positions, special codec ids in group 0 on the
    assistant part, ending with codec BOS at `frames_from - 1`), then frames: position p >= frames_from carries the
    previous frame's G codes, and the hidden state at p >= frames_from - 1 predicts the next frame; the second-to-last
    position predicts codec EOS, which the last position carries (group 0 only), as a teacher-forced sequence does."""
    talker = config["talker_config"]
    ht, groups = talker["thinker_hidden_size"], talker["num_code_groups"]
    vocab = talker["code_predictor_config"]["vocab_size"]
    eos = talker["codec_eos_token_id"]
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, s, ht, generator=g)
    mm = torch.zeros(b, s, dtype=torch.bool)
    mm[0, 1:4] = True
    if b > 1:
        mm[1, 2:3] = True
    hidden = torch.randn(int(mm.sum()), ht, generator=g) * 2
    codes = torch.full((b, s, groups), -1, dtype=torch.long)
    special = [talker["codec_nothink_id"], talker["codec_think_bos_id"], talker["codec_think_eos_id"],
               talker["speaker_id"]["ethan"], talker["codec_pad_id"], talker["codec_bos_id"]]
    codes[:, frames_from - len(special):frames_from, 0] = torch.tensor(special)
    n_frames = s - 1 - frames_from
    frames = torch.randint(0, vocab, (b, n_frames, groups), generator=g)
    codes[:, frames_from:s - 1] = frames
    codes[:, s - 1, 0] = eos
    rows = [(i, frames_from - 1 + t) for i in range(b) for t in range(n_frames)]
    frame_positions = torch.tensor([i * s + p for i, p in rows])
    frame_codes = torch.stack([frames[i, p - frames_from + 1] for i, p in rows])
    labels = torch.full((b, s), IGNORE, dtype=torch.long)  # target of each position (shifted)
    labels[:, frames_from - 1:s - 2] = frames[..., 0]
    labels[:, s - 2] = eos
    _, pos = text_batch(b=b, s=s, seed=seed)
    return TalkerBatch(thinker_embeds=embeds, multimodal_mask=mm, thinker_hidden=hidden, codec_codes=codes,
                       position_ids=pos, labels=labels, frame_positions=frame_positions, frame_codes=frame_codes)


def hf_labels(batch: TalkerBatch) -> torch.Tensor:
    """transformers' label convention (the label of position p + 1 is predicted at p; its loss shifts them)."""
    return torch.cat([torch.full_like(batch.labels[:, :1], IGNORE), batch.labels[:, :-1]], dim=1)


def hf_talker(hf_dir, dtype=torch.float32, whole_model: bool = False):
    """transformers' talker of an HF checkpoint dir, with the eager per-expert loop (llm_helpers.hf_thinker says why);
    `whole_model`: (the Qwen3OmniMoeForConditionalGeneration holding it, the talker)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype)
    talker = model.talker
    for module in talker.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"
    return (model, talker.eval()) if whole_model else talker.eval()


def hf_inputs_embeds(talker, batch: TalkerBatch) -> torch.Tensor:
    """The talker input as `generate` assembles it (_get_talker_user_parts / _get_talker_assistant_parts /
    prepare_inputs_for_generation): text_projection of embeddings, hidden_projection at multimodal positions, plus the
    codec embeddings (group 0: the talker's codec_embedding, group g: the code predictor's embedding g-1)."""
    out = talker.text_projection(batch.thinker_embeds)
    out[batch.multimodal_mask] = talker.hidden_projection(batch.thinker_hidden)
    codes = batch.codec_codes
    embeddings = [talker.get_input_embeddings()] + list(talker.code_predictor.get_input_embeddings())
    for group in range(codes.shape[-1]):
        present = codes[..., group] >= 0
        out[present] = out[present] + embeddings[group](codes[..., group][present])
    return out


def hf_talker_outputs(talker, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
    """(first-group logits [B, S, V] from the talker's forward, final hidden states [B, S, H] of its decoder)."""
    logits = talker(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False).logits
    hidden = talker.model(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False).last_hidden_state
    return logits, hidden


def hf_residual_logits(talker, hidden_rows: torch.Tensor, frame_codes: torch.Tensor) -> torch.Tensor:
    """Logits [G-1, N, V] of groups 1..G-1 through the code predictor's own forward, step by step as `generate`
    calls it: group j from the prefix [hidden, codec_embedding(c0), embedding_0(c1), ..., embedding_{j-2}(c_{j-1})]
    (its forward picks lm_head[j-1] from the prefix length)."""
    predictor = talker.code_predictor
    parts = [hidden_rows[:, None], talker.get_input_embeddings()(frame_codes[:, :1])]
    out = []
    for group in range(1, frame_codes.shape[1]):
        logits = predictor(inputs_embeds=torch.cat(parts, dim=1), use_cache=False).logits
        out.append(logits[:, -1])
        parts.append(predictor.get_input_embeddings()[group - 1](frame_codes[:, group : group + 1]))
    return torch.stack(out)
