"""The language-model loss over chunks of tokens: the [tokens, vocab/tp] logits of a long row never exist at once.

The output layer's logits of a 20-minute audio sample (15.6k tokens x 152,064 vocab) are 9.5 GB in fp32 per copy,
and the cross-entropy keeps its softmax for the backward beside them: the largest tensors of a step, growing with
the row while everything else of the LLM is per layer and split by TP / CP. `chunked_lm_loss` runs the output layer
and the cross-entropy on `chunk_tokens` logit rows at a time, each chunk under torch's non-reentrant activation
checkpoint: the forward keeps only the per-token losses (and the hidden states, which the decoder keeps anyway), the
backward recomputes one chunk's logits, takes their gradient and drops them before the next chunk. Peak: one chunk's
logits, softmax and gradient, whatever the row length. Cost: the output layer's forward matmul once more.

The same functions run on the same rows: every token's loss and its hidden state's gradient are those of the
unchunked loss (each row's logits are the same dot products), and the output weight's gradient is their sum over the
chunks, a reordering of the same fp32 sums (tests/test_chunked_loss.py: loss and gradients equal the unchunked
path to 1e-6 relative, at tp1 and tp2 + sequence parallelism).

Layouts. The chunks are cut from this rank's hidden states [s, b, h] along the sequence and each goes through the
model's own output layer and `compute_language_model_loss` (the fused vocab-parallel cross-entropy on the GPU,
mcore's elsewhere), so tensor parallelism (vocab-parallel logits, the TP all-reduces of the cross-entropy) is
untouched. With sequence parallelism the output layer all-gathers its input over the TP ranks: chunk [i, j) of
every rank's shard arrives as tp blocks, rank-major, so the labels of those positions are picked the same way and
the losses are put back in sequence order. Context parallelism cuts the labels before they get here (each CP rank
has its own tokens); a pipeline's last stage is the only one with an output layer. Every TP rank runs the same
chunks in the same order, in the forward and in the recomputing backward, so the collectives pair up.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def chunk_rows(chunk_tokens: int, gathered_ranks: int, batch: int) -> int:
    """Rows of this rank's [s, b, h] hidden states per chunk, such that a chunk's logits have at most
    `chunk_tokens` rows (at least one row): the output layer's all-gather over `gathered_ranks` (SP) multiplies
    them."""
    return max(1, chunk_tokens // (gathered_ranks * batch))


def chunked_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, logits_of: Callable, loss_of: Callable,
                    chunk_tokens: int, gathered_ranks: int = 1) -> torch.Tensor:
    """Per-token loss [b, S] of `labels` [b, S] (S = gathered_ranks x s), like `loss_of(labels, logits_of(hidden))`.

    `hidden` [s, b, h]: this rank's final hidden states (its SP shard when `gathered_ranks` = tp > 1);
    `logits_of(hidden_chunk)` -> logits [gathered_ranks x rows, b, V/tp] (the output layer, all-gathering an SP
    input); `loss_of(labels [b, n], logits [n, b, V/tp])` -> per-token loss [b, n]."""
    s, b, _ = hidden.shape
    if labels.shape != (b, gathered_ranks * s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)} gathered "
                         f"over {gathered_ranks} rank(s)")
    rows = chunk_rows(chunk_tokens, gathered_ranks, b)
    # [b, S] -> [b, ranks, s]: block r holds the positions of rank r's shard, the order the all-gather lays out
    blocks = labels.reshape(b, gathered_ranks, s)

    def chunk_loss(hidden_chunk: torch.Tensor, chunk_labels: torch.Tensor) -> torch.Tensor:
        return loss_of(chunk_labels, logits_of(hidden_chunk))

    losses = []
    for start in range(0, s, rows):
        stop = min(start + rows, s)
        chunk_labels = blocks[:, :, start:stop].reshape(b, -1)
        # no RNG in the output layer or the cross-entropy: nothing to replay, and no per-chunk RNG state copies
        loss = checkpoint(chunk_loss, hidden[start:stop], chunk_labels, use_reentrant=False,
                          preserve_rng_state=False)
        losses.append(loss.reshape(b, gathered_ranks, stop - start))
    return torch.cat(losses, dim=2).reshape(b, gathered_ranks * s)
