"""The AuT's length arithmetic (the audio tower's conv downsampling and chunking): how many tokens an audio clip
becomes. Pure Python on ints, integer arrays and tensors, so that the data side (token counts in the encoder and the
rope index), the FLOP counter and the memory planner use the audio model's own formula without importing the model."""

from __future__ import annotations


def conv_out_length(n, convs: int = 1):
    """Length after `convs` kernel-3, stride-2, padding-1 convolutions: the AuT's downsampling, along time and along
    the mel bins. Ints, integer arrays and tensors. The one definition (audio tower, FLOP counter, memory planner)."""
    for _ in range(convs):
        n = (n - 1) // 2 + 1
    return n


def audio_output_lengths(input_lengths, n_window: int = 50):
    """AuT output length for ``input_lengths`` mel frames (== transformers' ``_get_feat_extract_output_lengths``):
    13 tokens per full 2*n_window chunk plus the conv output of the rest. Ints, integer arrays and tensors."""
    chunk = n_window * 2
    return conv_out_length(input_lengths % chunk, 3) + (input_lengths // chunk) * 13
