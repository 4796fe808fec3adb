"""Chunk-causal attention: the mask rule, the SDPA reference and the Triton kernel (imported lazily)."""

from kernels.dispatch import (BACKENDS, attention_function, chunk_causal_attention, dense_attention,
                              triton_attention)
from kernels.reference import chunk_causal_mask, reference_attention

__all__ = ["BACKENDS", "attention_function", "chunk_causal_attention", "chunk_causal_mask", "dense_attention",
           "reference_attention", "triton_attention"]
