"""The kernels compile for the GPU — checked on any machine, GPU or not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from .conftest import requires_triton

pytestmark = requires_triton


def test_every_kernel_compiles_for_hopper(tmp_path):
    """Compile, without a GPU, each kernel variant a forward pass launches for sm_90 (H100/H200), in a process without
    the interpreter: catches kernels that run under the interpreter but would not compile for the GPU."""
    script = textwrap.dedent("""
        import torch
        from llama4_export.kernels import MoEWeights
        from llama4_export.kernels.triton_moe import compile_for_gpu
        e, h, i = 4, 256, 128
        tensors = [torch.randn(e, h), torch.randn(e, h, 2 * i), torch.randn(e, i, h), torch.randn(i, h),
                   torch.randn(i, h), torch.randn(h, i)]
        for weight_format, dtype, path in [("bf16", torch.bfloat16, "decode"), ("int4", torch.bfloat16, "decode"),
                                           ("fp8", torch.bfloat16, "prefill"), ("fp16", torch.float16, "prefill"),
                                           ("fp32", torch.float32, "decode")]:
            w = MoEWeights.from_checkpoint(*tensors, weight_format=weight_format)
            for line in compile_for_gpu(torch.randn(5, h).to(dtype), w, path, arch=90):
                print(weight_format, path, line)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 5 * 5 and all("sm_90" in line for line in lines), result.stdout
