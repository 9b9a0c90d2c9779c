"""``moe_forward``: the MoE layer on whatever can run it — Triton on a GPU, Triton's CPU interpreter, or torch.

Backend for a tensor's device: CUDA → Triton kernels; CPU with TRITON_INTERPRET=1 in the environment → the same kernels
under Triton's interpreter (slow; for tests); otherwise (CPU, or triton not installed) → the torch reference, so the
module works anywhere. ``path="auto"`` picks decode for at most DECODE_MAX_TOKENS tokens, else prefill; asking for
"decode"/"prefill" where Triton cannot run raises KernelError saying why.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .formats import KernelError, MoEWeights
from .reference import moe_reference

DECODE_MAX_TOKENS = 16
PATHS = ("auto", "decode", "prefill", "reference")
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernel_backend(device: torch.device | str) -> str:
    """'triton' (CUDA), 'interpreter' (CPU + TRITON_INTERPRET=1) or 'reference' for tensors on ``device``."""
    if importlib.util.find_spec("triton") is None:
        return "reference"
    if torch.device(device).type == "cuda":
        return "triton"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "interpreter"
    return "reference"


def _triton_kernels(backend: str):
    from . import triton_moe  # triton is an optional extra: imported only when a Triton path runs

    if backend == "interpreter" and not triton_moe.INTERPRETED:
        raise KernelError("TRITON_INTERPRET=1 was set after llama4_export.kernels.triton_moe was imported, so its kernels "
                          "were built for a GPU; set it in the environment before the first import")
    return triton_moe


def moe_forward(x: torch.Tensor, weights: MoEWeights, path: str = "auto", tiles=None) -> torch.Tensor:
    """out = shared(x) + expert_e(x * sigmoid(logit_e)), e = argmax(x @ router.T). x [..., H] → [..., H] in x.dtype.

    path: auto | decode | prefill | reference. ``tiles`` (a triton_moe.Tiles) overrides the path's tile sizes."""
    if path not in PATHS:
        raise KernelError(f"unknown MoE path {path!r}; use one of {', '.join(PATHS)}")
    if x.shape[-1] != weights.hidden_size:
        raise KernelError(f"MoE input has {x.shape[-1]} features, the router expects {weights.hidden_size}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise KernelError(f"MoE input dtype {x.dtype} is unsupported; use bfloat16, float16 or float32")
    if weights.router.device != x.device:
        raise KernelError(f"MoE input is on {x.device} but its weights are on {weights.router.device}; "
                          "move them with weights.to(device)")
    backend = kernel_backend(x.device)
    if path == "reference" or (path == "auto" and backend == "reference"):
        return moe_reference(x, weights)
    if backend == "reference":
        why = ("triton is not installed (pip install 'llama4-export[kernels]')" if importlib.util.find_spec("triton")
               is None else f"x is on {x.device}: use a CUDA tensor, or set TRITON_INTERPRET=1 for the CPU interpreter")
        raise KernelError(f"MoE path {path!r} needs Triton, but {why}; path='auto' falls back to the torch reference")
    kernels = _triton_kernels(backend)
    flat = x.reshape(-1, x.shape[-1])
    if path == "auto":
        path = "decode" if flat.shape[0] <= DECODE_MAX_TOKENS else "prefill"
    return kernels.moe_triton(flat, weights, path, tiles).reshape(x.shape)
