"""omni_model: Qwen3-Omni on Megatron-Core, and everything that must agree with it (weights, data, training)."""
