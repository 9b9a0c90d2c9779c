"""Weight formats and the torch references — pure torch, no Triton: these run everywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from llama4_export.graph_passes.moe_reference import route_top1 as numpy_route_top1
from llama4_export.kernels import (
    KernelError, MoEWeights, kernel_backend, moe_forward, moe_reference, quantize_fp8, quantize_int4,
    route_top1,
)

from .conftest import checkpoint_tensors, make_case, numpy_reference


def test_int4_packing_by_hand_odd_k():
    # W = q * s with integer q in -7..7 quantizes exactly; K = 45 is padded to 64 with block 32.
    g = torch.Generator().manual_seed(0)
    k, n, block = 45, 6, 32
    q = torch.randint(-7, 8, (k, n), generator=g)
    q[0] = 7  # every (n, block) has amax 7·s, so the scale is exactly s
    q[32] = -7
    s = torch.tensor([0.5, 0.25, 2.0, 1.0, 0.125, 4.0])  # per output column, exact in fp16
    packed = quantize_int4((q * s).float()[None], block=block)
    assert packed.packed.shape == (1, n, 32) and packed.scales.shape == (1, n, 2) and packed.in_features == k
    np.testing.assert_array_equal(packed.scales[0].float().numpy(), np.repeat(s.numpy()[:, None], 2, axis=1))
    nibbles = np.full((n, 64), 8, dtype=np.uint8)  # padding k >= 45 holds nibble 8 (= 0)
    nibbles[:, :k] = (q.T.numpy() + 8).astype(np.uint8)
    expected = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)  # low nibble = even k
    np.testing.assert_array_equal(packed.packed[0].numpy(), expected)
    np.testing.assert_array_equal(packed.dequantize()[0].numpy(), (q * s).numpy())


def test_int4_layout_is_onnxruntime_matmulnbits():
    """Our packed [N, Kp/2] + scales [N, Kp/block] fed unchanged to com.microsoft.MatMulNBits give x @ dequantized W."""
    g = torch.Generator().manual_seed(1)
    m, k, n, block = 3, 80, 24, 32
    weight = quantize_int4(torch.randn(1, k, n, generator=g), block=block, scale_dtype=torch.float32)
    x = torch.randn(m, k, generator=g)
    blocks = weight.packed.shape[-1] * 2 // block
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=1)
    graph = helper.make_graph(
        [node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=[
            onnx.numpy_helper.from_array(weight.packed[0].numpy().reshape(n, blocks, block // 2), "B"),
            onnx.numpy_helper.from_array(weight.scales[0].numpy().reshape(n * blocks), "scales"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"A": x.numpy()})
    ref = x.double() @ weight.dequantize(dtype=torch.float64)[0]
    np.testing.assert_allclose(y, ref.numpy(), rtol=0, atol=1e-4 * ref.abs().max().item())


def test_int4_round_trip_error_is_half_a_step():
    w = torch.randn(2, 200, 16, generator=torch.Generator().manual_seed(2))
    q = quantize_int4(w, block=64)
    step = q.scales.float().repeat_interleave(64, dim=-1)[..., :200].transpose(1, 2)  # [E, K, N]
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_fp8_scale_and_round_trip():
    w = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 0.01, 100.0])[:, None, None]
    q = quantize_fp8(w)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.shape == (3,)
    torch.testing.assert_close(q.scale, w.abs().amax(dim=(1, 2)) / 448, rtol=1e-6, atol=0)
    # E4M3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal numbers (|w|/scale >= 2^-6).
    normal = (w.abs() / q.scale[:, None, None]) >= 2**-6
    rel = ((q.dequantize() - w).abs() / w.abs())[normal]
    assert rel.max() <= 2**-4


def test_int4_block_must_be_a_multiple_of_32():
    with pytest.raises(KernelError, match="block size 48"):
        quantize_int4(torch.zeros(1, 64, 8), block=48)


def test_from_checkpoint_names_the_bad_tensor():
    e, h, i = 2, 16, 8
    with pytest.raises(KernelError, match=r"experts\.down_proj has shape \(2, 16, 8\), expected \(2, 8, 16\)"):
        MoEWeights.from_checkpoint(torch.zeros(e, h), torch.zeros(e, h, 2 * i), torch.zeros(e, h, i),
                                   torch.zeros(i, h), torch.zeros(i, h), torch.zeros(h, i))


def test_bytes_read_counts_only_the_selected_experts():
    _, w = make_case([0, 1], hidden=64, inter=32, experts=4, weight_format="int4", block=32, device="cpu")
    expert_int4 = 3 * (64 * 32 // 2 + 32 * 2 * 2)  # gate, up, down: K*N/2 bytes + N*K/32 fp16 scales each
    router = 4 * 64 * 2  # bf16
    assert w.bytes_read(2) == 2 * expert_int4 + expert_int4 + router  # 2 experts + the shared expert


@pytest.mark.parametrize("weight_format", ["bf16", "fp16", "int4", "fp8"])
def test_torch_reference_equals_numpy_reference(weight_format):
    x, w = make_case([2, 0, 2, 1, 0, 2], weight_format=weight_format, batch_shape=(2, 3), device="cpu")
    ours = moe_reference(x.double(), w, compute_dtype=torch.float64)
    np.testing.assert_allclose(ours.numpy(), numpy_reference(x, w), rtol=0, atol=1e-12)


def test_route_top1_equals_numpy():
    x, w = make_case([3, 1, 1, 0, 2], device="cpu")
    index, score = route_top1(x.double(), w.router, compute_dtype=torch.float64)
    np_index, np_score = numpy_route_top1(x.double().numpy(), checkpoint_tensors(w)["router"])
    np.testing.assert_array_equal(index.numpy(), np_index)
    np.testing.assert_allclose(score.numpy(), np_score, rtol=1e-14)
    np.testing.assert_array_equal(np_index, [3, 1, 1, 0, 2])  # the case builder's routing holds


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = make_case([1, 1, 0], device="cpu")
    assert kernel_backend("cpu") == "reference"
    torch.testing.assert_close(moe_forward(x, w), moe_reference(x, w), rtol=0, atol=0)
    with pytest.raises(KernelError, match="needs Triton"):
        moe_forward(x, w, path="decode")


def test_package_imports_and_runs_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        from llama4_export.kernels import KernelError, MoEWeights, kernel_backend, moe_forward
        e, h, i = 2, 16, 8
        w = MoEWeights.from_checkpoint(torch.randn(e, h), torch.randn(e, h, 2 * i), torch.randn(e, i, h),
                                       torch.randn(i, h), torch.randn(i, h), torch.randn(h, i), weight_format="int4",
                                       block=32)
        assert kernel_backend("cuda") == "reference"
        print(tuple(moe_forward(torch.randn(3, h), w).shape))
        try:
            moe_forward(torch.randn(3, h), w, path="prefill")
        except KernelError as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shape, message = result.stdout.strip().splitlines()
    assert shape == "(3, 16)"
    assert "triton is not installed" in message and "pip install" in message


def test_moe_forward_rejects_bad_calls():
    x, w = make_case([0, 1], device="cpu")
    with pytest.raises(KernelError, match="weights are on meta"):
        moe_forward(x, w.to("meta"))
    with pytest.raises(KernelError, match="unknown MoE path 'fast'"):
        moe_forward(x, w, path="fast")
    with pytest.raises(KernelError, match="has 32 features, the router expects 64"):
        moe_forward(x[:, :32], w)
