"""Megatron-Core Qwen3-Omni thinker: language model, vision encoder, audio encoder."""
