"""The Triton MoE kernels against the references: under the CPU interpreter in CI, compiled on a GPU when there is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama4_export.kernels import expert_matmul, expert_swiglu, kernel_backend, moe_forward, moe_reference, route_top1

from .conftest import (
    ACTIVATION, DEVICE, HAS_CUDA, HAS_TRITON, REL_BOUND, gpu_only, make_case, numpy_reference, relative_error,
    requires_runnable_kernels, requires_triton,
)

pytestmark = [requires_triton, requires_runnable_kernels]
if HAS_TRITON:
    from llama4_export.kernels.triton_moe import Tiles, block_groups, decode_groups, grouped_expert, router_top1

# Small tiles so the toy shapes still take several N tiles, K steps and row chunks.
SMALL = Tiles(block_m=16, block_n=32, block_k=32) if HAS_TRITON else None
FORMATS = ["bf16", "fp16", "int4", "fp8"]

# name: (routing token → expert, hidden, intermediate, experts, batch shape)
SCENARIOS = {
    "batch_2x3": ([2, 0, 2, 1, 0, 2], 64, 48, 4, (2, 3)),
    "all_same_expert": ([2] * 7, 64, 48, 4, None),
    "unpicked_experts": ([5, 1, 6], 64, 48, 8, None),  # 5 of 8 experts picked by nobody (their weights are NaN)
    "one_token": ([3], 64, 48, 4, (1, 1)),
    "odd_sizes": ([0, 2, 1, 2, 0], 71, 37, 3, None),  # H, I not multiples of any tile or of the INT4 block
    # Expert 0 gets 66 tokens: decode's 64-row tile loops twice over them, prefill splits them into 16-row blocks.
    "more_rows_than_a_tile": ([0] * 33 + [1, 2, 1, 3] + [0] * 33, 64, 48, 4, None),
}


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("weight_format", FORMATS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_moe_matches_numpy_reference(scenario, weight_format, path):
    assign, hidden, inter, experts, batch_shape = SCENARIOS[scenario]
    x, w = make_case(assign, hidden, inter, experts, batch_shape, weight_format)
    y = moe_forward(x, w, path=path, tiles=SMALL)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert relative_error(y, numpy_reference(x, w)) <= REL_BOUND[x.dtype]


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_fp32_activations_are_near_exact(path):
    x, w = make_case([1, 0, 1, 3, 3], weight_format="fp32")
    assert relative_error(moe_forward(x, w, path=path, tiles=SMALL), numpy_reference(x, w)) <= REL_BOUND[torch.float32]


@pytest.mark.parametrize("block", [32, 96, 128])
def test_int4_block_sizes_with_default_tiles(block):
    # K = 160: with block 128 the second block is mostly padding; block 96 is no power of two (K tile 32); default
    # tiles exercise the real tile sizes.
    x, w = make_case([0, 1, 1], hidden=160, inter=96, weight_format="int4", block=block)
    for path in ("decode", "prefill"):
        assert relative_error(moe_forward(x, w, path=path), numpy_reference(x, w)) <= REL_BOUND[torch.bfloat16]


def test_auto_path_picks_decode_then_prefill():
    x, w = make_case([i % 4 for i in range(20)])
    assert torch.equal(moe_forward(x[:16], w), moe_forward(x[:16], w, path="decode"))
    assert torch.equal(moe_forward(x, w), moe_forward(x, w, path="prefill"))
    assert kernel_backend(DEVICE) == ("triton" if HAS_CUDA else "interpreter")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_router_kernel_matches_torch_reference(dtype):
    assign = [4, 0, 2, 2, 1, 3, 0, 4, 1, 1, 2, 0, 3, 3, 4, 2, 0, 1]  # 18 tokens: two token tiles
    x, w = make_case(assign, hidden=72, experts=5)
    expert, score = router_top1(x.to(dtype), w.router)
    ref_expert, ref_score = route_top1(x.to(dtype), w.router, compute_dtype=torch.float64)
    assert expert.tolist() == ref_expert.tolist() == assign
    torch.testing.assert_close(score.double(), ref_score, rtol=0, atol=1e-6)


def test_router_ties_pick_the_first_expert():
    # Small integers: every logit is exact in fp32. Logits are (0.5, 1, -1, 1) * c|r|^2: experts 1 and 3 tie exactly.
    r = torch.randint(-2, 3, (32,), generator=torch.Generator().manual_seed(0)).float()
    router = torch.stack([0.5 * r, r, -r, r]).to(torch.bfloat16).to(DEVICE)
    x = (torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0])[:, None] * r).to(torch.bfloat16).to(DEVICE)
    expert, _ = router_top1(x, router)
    assert expert.tolist() == [1] * 5 == np.argmax(x.double().cpu().numpy() @ router.double().cpu().numpy().T,
                                                   axis=1).tolist()


@pytest.mark.parametrize("weight_format", FORMATS)
def test_grouped_kernels_match_torch_references(weight_format):
    """The SwiGLU (gate/up) and down kernels alone, on both group tables, against expert_swiglu / expert_matmul."""
    assign = torch.tensor([3, 0, 3, 3, 1, 0, 3])
    x, w = make_case(assign.tolist(), hidden=72, inter=40, weight_format=weight_format)
    dtype = ACTIVATION[weight_format]
    experts = assign.to(DEVICE)
    score = torch.linspace(0.2, 0.9, len(assign), device=DEVICE)
    xs = (x.float() * score[:, None]).to(dtype)  # the kernel rounds x * score to the activation dtype
    h_ref = expert_swiglu(xs, experts, None, w.gate, w.up, compute_dtype=torch.float64)
    y_ref = expert_matmul(h_ref.to(dtype), experts, w.down, compute_dtype=torch.float64)
    for groups in (decode_groups(experts, 4), block_groups(experts, 4, SMALL.block_m)):
        sorted_tokens = groups.tokens.long()
        h = grouped_expert(x, groups, w.gate, torch.empty(7, 40, device=DEVICE), SMALL, w2=w.up, row_scale=score,
                           gather_a=True)  # fp32 output: compare before any rounding of h
        assert relative_error(h, h_ref[sorted_tokens].cpu().numpy()) <= 1e-5
        y = grouped_expert(h_ref.to(dtype)[sorted_tokens], groups, w.down, torch.empty(7, 72, device=DEVICE), SMALL,
                           scatter_c=True)
        assert relative_error(y, y_ref.cpu().numpy()) <= 1e-5


@pytest.mark.parametrize("assign", [[2, 2, 2], [0], [4, 1, 4, 0, 1, 4, 4, 4, 4, 4, 4, 1], []])
def test_group_tables(assign):
    """Every token lands in exactly one group of its expert; decode has one group per picked expert."""
    experts = torch.tensor(assign, dtype=torch.int32, device=DEVICE)
    num_experts, block_m = 6, 4
    for groups, decode in ((decode_groups(experts, num_experts), True), (block_groups(experts, num_experts, block_m),
                                                                         False)):
        seen = []
        tokens = groups.tokens.tolist()
        for e, start, rows in zip(groups.expert.tolist(), groups.start.tolist(), groups.rows.tolist()):
            members = tokens[start:start + rows]
            assert all(assign[t] == e for t in members)
            assert decode or rows <= block_m
            seen += members
        assert sorted(seen) == list(range(len(assign)))
        if decode:
            picked = sorted(set(assign))
            assert [e for e, r in zip(groups.expert.tolist(), groups.rows.tolist()) if r] == picked
            assert groups.expert.numel() == min(len(assign), num_experts)


@gpu_only
@pytest.mark.parametrize("tokens", [1, 16, 333])
@pytest.mark.parametrize("weight_format", FORMATS)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_gpu_default_tiles_at_larger_shapes(path, weight_format, tokens):
    # Compiled kernels with the default tiles (tensor-core dots in bf16/fp16) against the float64 torch reference,
    # itself checked against the numpy reference above.
    x, w = make_case([(7 * t) % 16 for t in range(tokens)], hidden=1024, inter=512, experts=16,
                     weight_format=weight_format, block=128)
    ref = moe_reference(x.double(), w, compute_dtype=torch.float64).cpu().numpy()
    assert relative_error(moe_forward(x, w, path=path), ref) <= REL_BOUND[x.dtype]


@gpu_only
def test_gpu_auto_backend_is_triton():
    x, w = make_case([0, 1, 2])
    assert x.is_cuda and kernel_backend(x.device) == "triton"
    assert torch.equal(moe_forward(x, w), moe_forward(x, w, path="decode"))
