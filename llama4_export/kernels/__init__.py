"""Triton kernels for the Llama 4 MoE layer (the TensorRT plugin's body), their torch references and a dispatcher.

Importable without triton, TensorRT or a GPU: triton is imported only when a Triton path runs (see dispatch.py).
"""

from .dispatch import DECODE_MAX_TOKENS, kernel_backend, moe_forward
from .formats import (
    FORMATS, DenseWeight, ExpertWeight, Fp8Weight, Int4Weight, KernelError, MoEWeights, dequantize_fp8,
    dequantize_int4, quantize_fp8, quantize_int4,
)
from .reference import expert_matmul, expert_swiglu, moe_reference, route_top1

__all__ = [
    "DECODE_MAX_TOKENS", "FORMATS", "DenseWeight", "ExpertWeight", "Fp8Weight", "Int4Weight", "KernelError", "MoEWeights",
    "dequantize_fp8", "dequantize_int4", "expert_matmul", "expert_swiglu", "kernel_backend", "moe_forward",
    "moe_reference", "quantize_fp8", "quantize_int4", "route_top1",
]
