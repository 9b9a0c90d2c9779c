"""Kernel tests: on a CUDA GPU the Triton kernels run for real; without one they run under Triton's CPU interpreter.

triton.jit chooses the interpreter when TRITON_INTERPRET=1 is in the environment at the moment a kernel is decorated, i.e.
when llama4_export.kernels.triton_moe is first imported. pytest loads this conftest before the test modules beside it, so
the kernels are imported here under TRITON_INTERPRET=1 and the variable is put back at once: the rest of the suite never
sees it. The autouse fixture sets it again for each kernel test, because moe_forward reads it to pick its backend.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import numpy as np
import pytest
import torch

from llama4_export.graph_passes.moe_reference import llama4_moe
from llama4_export.kernels import MoEWeights

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = HAS_TRITON and not HAS_CUDA
DEVICE = "cuda" if HAS_CUDA else "cpu"

if INTERPRET:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import llama4_export.kernels.triton_moe  # noqa: F401  (decorates the kernels for the interpreter)
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[kernels]')")
# Seen with triton 3.2 and 3.6 (numpy 2.4): their interpreter fails on a loop with a runtime bound. GPU runs are fine.
OLD_INTERPRETER = INTERPRET and tuple(map(int, importlib.metadata.version("triton").split(".")[:2])) < (3, 9)
requires_runnable_kernels = pytest.mark.skipif(
    OLD_INTERPRETER, reason="Triton's CPU interpreter before 3.9 cannot run these kernels; install triton>=3.9")


def gpu_only(test):
    """Marker `gpu`, skipped with a reason when there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (runs the compiled kernels)")(test))


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# Bounds on max|y - ref| / max|ref| against the float64 numpy reference (which gets the same, dequantized, weights).
# The kernels round three times to the activation dtype — the routed input x*score, the SwiGLU output h, the result —
# each by at most half an ulp (u/2 relative, u = 2^-8 for bf16, 2^-11 for fp16), and the linear maps after them have
# O(1) gain relative to the output's maximum; fp32 accumulation adds ~K * 2^-24. Expected ~1-2 u: the bound is 4 u.
# fp32 activations only see fp32 accumulation over K <= 128 terms (<< 1e-5).
REL_BOUND = {torch.bfloat16: 4 * 2**-8, torch.float16: 4 * 2**-11, torch.float32: 1e-5}
ACTIVATION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int4": torch.bfloat16,
              "fp8": torch.bfloat16}


def relative_error(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ours.double().cpu().numpy() - ref).max() / np.abs(ref).max())


def checkpoint_tensors(weights: MoEWeights) -> dict[str, np.ndarray]:
    """The weights as float64 numpy in checkpoint layout (dequantized): the numpy reference's inputs."""
    def dq(w):
        return w.dequantize(dtype=torch.float64).cpu().numpy()

    return dict(
        router=weights.router.double().cpu().numpy(),
        gate_up=np.concatenate([dq(weights.gate), dq(weights.up)], axis=-1), down=dq(weights.down),
        shared_gate=dq(weights.shared_gate)[0].T, shared_up=dq(weights.shared_up)[0].T,
        shared_down=dq(weights.shared_down)[0].T,
    )


def numpy_reference(x: torch.Tensor, weights: MoEWeights) -> np.ndarray:
    flat = x.reshape(-1, x.shape[-1]).double().cpu().numpy()
    return llama4_moe(flat, **checkpoint_tensors(weights)).reshape(x.shape)


def make_case(assign, hidden: int = 64, inter: int = 48, experts: int = 4, batch_shape=None, weight_format="bf16",
              block: int = 32, seed: int = 0, device: str = DEVICE, poison_unpicked: bool = True):
    """(x, weights) whose top-1 routing is ``assign`` (token → expert) by construction, with margins >= 0.5.

    Router rows are orthonormal directions q_e; x_t = (noise orthogonal to every q_e) + sum_e l_te q_e, so the logits are
    exactly l_te up to rounding: the chosen l ~ U(-1.5, 2.5) (scores 0.18-0.92), the others 0.5-3 below it. Experts no
    token picked get NaN weights (poison_unpicked): a kernel that reads them at all produces NaN."""
    g = torch.Generator().manual_seed(seed)
    assign = torch.as_tensor(assign)
    tokens = assign.numel()
    q, _ = torch.linalg.qr(torch.randn(hidden, experts, generator=g, dtype=torch.float64))
    directions = q.T  # [E, H] orthonormal rows
    chosen = torch.rand(tokens, generator=g, dtype=torch.float64) * 4 - 1.5
    logits = chosen[:, None] - (0.5 + 2.5 * torch.rand(tokens, experts, generator=g, dtype=torch.float64))
    logits[torch.arange(tokens), assign] = chosen
    noise = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    noise -= (noise @ directions.T) @ directions
    x = noise + logits @ directions

    def rand(*shape, fan_in):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / fan_in**0.5

    gate_up, down = rand(experts, hidden, 2 * inter, fan_in=hidden), rand(experts, inter, hidden, fan_in=inter)
    if poison_unpicked:
        unpicked = torch.ones(experts, dtype=torch.bool)
        unpicked[assign] = False
        gate_up[unpicked] = float("nan")
        down[unpicked] = float("nan")
    weights = MoEWeights.from_checkpoint(
        directions.to(torch.bfloat16), gate_up, down, rand(inter, hidden, fan_in=hidden),
        rand(inter, hidden, fan_in=hidden), rand(hidden, inter, fan_in=inter), weight_format=weight_format, block=block,
    )
    weights = weights.to(device)
    x = x.to(ACTIVATION[weight_format]).to(device)
    if batch_shape is not None:
        x = x.reshape(*batch_shape, hidden)
    return x, weights
