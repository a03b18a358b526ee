"""Device and parallel setup (incl. the CPU/gloo patches for Megatron-Core)."""
