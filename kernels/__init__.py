"""Chunk-causal attention: the mask rule, the SDPA reference and the Triton kernel (imported lazily)."""

from kernels.dispatch import chunk_causal_attention
from kernels.reference import chunk_causal_mask, reference_attention

__all__ = ["chunk_causal_attention", "chunk_causal_mask", "reference_attention"]
