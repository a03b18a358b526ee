"""HF <-> Megatron-Core parameter mapping and checkpoint conversion."""
