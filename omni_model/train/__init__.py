"""Training loop on Megatron-Core."""
