"""echo-megatron: Spectral Koopman Attention for Megatron-Core."""
