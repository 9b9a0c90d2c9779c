"""Triton kernels for the Llama 4 MoE layer (top-1 sigmoid routing, routed expert input scaled by the score, shared expert).

Imports triton at module level: import this module only through ``llama4_export.kernels.dispatch`` (which checks that
triton is installed) or directly when you know it is. ``triton.jit`` picks the CPU interpreter when TRITON_INTERPRET=1
is in the environment at the moment this module is imported; ``INTERPRETED`` records which one it got.

Launches for one MoE forward (x [T, H]):
1. ``_router_top1_kernel``: logits = x @ router.T, argmax and sigmoid fused → expert [T] int32, score [T] fp32.
2. grouping in torch on the device (histogram + stable sort + a group table; no host synchronisation);
3. ``_grouped_expert_kernel`` with SWIGLU: h = silu(xs @ gate_e) * (xs @ up_e), xs = x * score, rows in expert order;
4. ``_grouped_expert_kernel``: routed = h @ down_e, scattered back to token order (fp32);
5./6. the same two for the shared expert (every token, unscaled); its down projection adds ``routed`` and writes out.

A program of ``_grouped_expert_kernel`` owns one (row group, N tile) and loops over the group's rows in BLOCK_M chunks.
Decode: one group per selected expert holding all its tokens, BLOCK_M >= tokens, so each selected expert's weights are
read once however many tokens picked it (grid = min(T, E) groups x N tiles; groups of experts nobody picked are empty).
Prefill: groups are BLOCK_M-row blocks of the expert-sorted tokens (vLLM-style padded block table), a grouped GEMM.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .formats import DenseWeight, ExpertWeight, Fp8Weight, Int4Weight, KernelError, MoEWeights

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

DENSE, INT4, FP8 = 0, 1, 2


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch parameters. block_m is the token tile; block_k is capped by the INT4 block size."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        # tl.dot needs every tile dimension >= 16; INT4 halves the K tile (even / odd k).
        for name, least in (("block_m", 16), ("block_n", 16), ("block_k", 32)):
            value = getattr(self, name)
            if value < least or value & (value - 1):
                raise KernelError(f"Tiles.{name} = {value}: use a power of two >= {least}")


# Starting points, not tuned (no GPU was available when they were written): benchmarks/moe_kernels.py is where to tune.
DECODE_TILES = Tiles(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
PREFILL_TILES = Tiles(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)
DECODE_MAX_BLOCK_M = 64  # more tokens than this in one decode group: loop (weights re-read from L2 per chunk)


@triton.jit
def _router_top1_kernel(x_ptr, w_ptr, expert_ptr, score_ptr, T, E, K, stride_xt, stride_xk, stride_we, stride_wk,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_F32: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_ok = offs_t < T
    e_ok = offs_e < E
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_e[None, :] * stride_we,
                    mask=k_ok[:, None] & e_ok[None, :], other=0.0)
        acc = _dot(x, w.to(x.dtype), acc, DOT_F32)
    logits = tl.where(e_ok[None, :], acc, float("-inf"))
    top, best = tl.max(logits, axis=1, return_indices=True, return_indices_tie_break_left=True)
    tl.store(expert_ptr + offs_t, best.to(tl.int32), mask=t_ok)
    tl.store(score_ptr + offs_t, tl.sigmoid(top), mask=t_ok)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_F32: widen both operands and multiply in exact fp32 — for fp32
    activations, and for bf16 under the interpreter, whose tl.dot does not support bf16 (triton-lang/triton#11584)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _int4_tile_dot(acc, x_even, x_odd, w_ptrs, s_ptrs, n_ok, DOT_F32: tl.constexpr):
    """acc += (x_even @ lo + x_odd @ hi) * scale: the tile's K range lies inside one quantization block."""
    packed = tl.load(w_ptrs, mask=n_ok[None, :], other=0x88)
    # -8..7 is exact in every activation dtype; going through fp32 because the interpreter casts int → bf16 wrongly.
    low = ((packed & 0x0F).to(tl.int32) - 8).to(tl.float32).to(x_even.dtype)
    high = ((packed >> 4).to(tl.int32) - 8).to(tl.float32).to(x_even.dtype)
    part = _dot(x_even, low, tl.zeros(acc.shape, dtype=tl.float32), DOT_F32)
    part = _dot(x_odd, high, part, DOT_F32)
    scale = tl.load(s_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    return acc + part * scale[None, :]


@triton.jit
def _round_to(v, dtype: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr):
    """fp32 → dtype, rounding to nearest even. The interpreter truncates fp32 → bf16 (the GPU rounds), so under the
    interpreter bf16 is rounded here with integer ops; the final cast is then exact."""
    if BF16_RNE_BY_HAND and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _scale_rows(x, row_scale, ROW_SCALE: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr):
    # The routed expert's input is x * score, rounded to the activation dtype as a bf16/fp16 graph would.
    if ROW_SCALE:
        x = _round_to(x.to(tl.float32) * row_scale[:, None], x.dtype, BF16_RNE_BY_HAND)
    return x


@triton.jit
def _grouped_expert_kernel(
    a_ptr, stride_am, stride_ak, token_ptr, row_scale_ptr, group_expert_ptr, group_start_ptr, group_rows_ptr,
    w1_ptr, s1_ptr, w2_ptr, s2_ptr, stride_we, stride_wk, stride_wn, stride_se, stride_sn, stride_sk,
    c_ptr, stride_cm, stride_cn, res_ptr, stride_rm, stride_rn, K, N, K_PADDED,
    FORMAT: tl.constexpr, SWIGLU: tl.constexpr, GATHER_A: tl.constexpr, ROW_SCALE: tl.constexpr,
    SCATTER_C: tl.constexpr, ADD_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr, DOT_F32: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
):
    """C[rows] = f(A[rows] @ W1[e]) for one group of rows sharing expert e: f = identity, or silu(.) * (A @ W2[e]).

    Dense/FP8 weights are [E, K, N] with strides (we, wk, wn); INT4 packed is [E, N, Kp/2] with strides (we, wk per byte,
    wn) and scales [E, N, Kp/QBLOCK] (se, sn, sk); FP8 scales are [E] (se). Rows pos = start .. start+rows-1 read A at
    token[pos] (GATHER_A) or pos, write C at token[pos] (SCATTER_C) or pos, and scale A by row_scale[A row].
    """
    group = tl.program_id(0)
    rows = tl.load(group_rows_ptr + group)
    start = tl.load(group_start_ptr + group)
    expert = tl.load(group_expert_ptr + group).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w1 = w1_ptr + expert * stride_we
    w2 = w2_ptr + expert * stride_we
    for m0 in range(0, rows, BLOCK_M):
        offs_r = m0 + tl.arange(0, BLOCK_M)
        r_ok = offs_r < rows
        pos = start + offs_r
        a_row = pos
        c_row = pos
        if GATHER_A:
            a_row = tl.load(token_ptr + pos, mask=r_ok, other=0)
        if SCATTER_C:
            c_row = tl.load(token_ptr + pos, mask=r_ok, other=0)
        row_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if ROW_SCALE:
            row_scale = tl.load(row_scale_ptr + a_row, mask=r_ok, other=0.0)
        a_rows = a_ptr + a_row.to(tl.int64)[:, None] * stride_am
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # FORMAT: DENSE / INT4 / FP8 = 0 / 1 / 2.
        if FORMAT == 1:  # INT4: split the K tile into even/odd k so each nibble plane is a plain [BLOCK_K/2, N] matrix
            offs_half = tl.arange(0, BLOCK_K // 2)
            s1 = s1_ptr + expert * stride_se + offs_n * stride_sn
            s2 = s2_ptr + expert * stride_se + offs_n * stride_sn
            for k0 in range(0, K_PADDED, BLOCK_K):
                k_even = k0 + 2 * offs_half
                x_even = tl.load(a_rows + k_even[None, :] * stride_ak, mask=r_ok[:, None] & (k_even < K)[None, :],
                                 other=0.0)
                x_odd = tl.load(a_rows + (k_even + 1)[None, :] * stride_ak,
                                mask=r_ok[:, None] & (k_even + 1 < K)[None, :], other=0.0)
                x_even = _scale_rows(x_even, row_scale, ROW_SCALE, BF16_RNE_BY_HAND)
                x_odd = _scale_rows(x_odd, row_scale, ROW_SCALE, BF16_RNE_BY_HAND)
                byte_offs = (k0 // 2 + offs_half)[:, None] * stride_wk + offs_n[None, :] * stride_wn
                block_off = (k0 // QBLOCK) * stride_sk
                acc1 = _int4_tile_dot(acc1, x_even, x_odd, w1 + byte_offs, s1 + block_off, n_ok, DOT_F32)
                if SWIGLU:
                    acc2 = _int4_tile_dot(acc2, x_even, x_odd, w2 + byte_offs, s2 + block_off, n_ok, DOT_F32)
        else:
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                x = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                x = _scale_rows(x, row_scale, ROW_SCALE, BF16_RNE_BY_HAND)
                w_offs = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
                w_mask = k_ok[:, None] & n_ok[None, :]
                acc1 = _dot(x, tl.load(w1 + w_offs, mask=w_mask, other=0.0).to(x.dtype), acc1, DOT_F32)
                if SWIGLU:
                    acc2 = _dot(x, tl.load(w2 + w_offs, mask=w_mask, other=0.0).to(x.dtype), acc2, DOT_F32)
            if FORMAT == 2:  # FP8: one scale per expert matrix, applied once to the fp32 accumulator
                acc1 = acc1 * tl.load(s1_ptr + expert * stride_se)
                if SWIGLU:
                    acc2 = acc2 * tl.load(s2_ptr + expert * stride_se)
        out = acc1
        if SWIGLU:
            out = acc1 * tl.sigmoid(acc1) * acc2
        c_mask = r_ok[:, None] & n_ok[None, :]
        c_row64 = c_row.to(tl.int64)[:, None]
        if ADD_RESIDUAL:
            out += tl.load(res_ptr + c_row64 * stride_rm + offs_n[None, :] * stride_rn, mask=c_mask, other=0.0)
        tl.store(c_ptr + c_row64 * stride_cm + offs_n[None, :] * stride_cn,
                 _round_to(out, c_ptr.dtype.element_ty, BF16_RNE_BY_HAND), mask=c_mask)


def _dot_f32(dtype: torch.dtype) -> bool:
    # fp32 activations get exact fp32 products (not TF32); bf16 operands are widened only under the interpreter
    # (exact: bf16 x bf16 products fit fp32, which is also what the tensor cores accumulate in).
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def run_kernel(kernel, grid, args: dict, options: dict) -> None:
    """The default launcher: run ``kernel`` on ``grid``. ``compile_for_gpu`` passes one that compiles instead."""
    kernel[grid](**args, **options)


def router_top1(x: torch.Tensor, router: torch.Tensor, launch=run_kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], router [E, H] → (expert int32 [T], sigmoid(top logit) fp32 [T]). Logits accumulate in fp32."""
    t, h = x.shape
    expert = torch.zeros(t, dtype=torch.int32, device=x.device)  # zeros: valid indices even when only compiled
    score = torch.empty(t, dtype=torch.float32, device=x.device)
    if t == 0:
        return expert, score
    block_t = 16
    args = dict(
        x_ptr=x, w_ptr=router, expert_ptr=expert, score_ptr=score, T=t, E=router.shape[0], K=h,
        stride_xt=x.stride(0), stride_xk=x.stride(1), stride_we=router.stride(0), stride_wk=router.stride(1),
        BLOCK_T=block_t, BLOCK_E=max(16, triton.next_power_of_2(router.shape[0])), BLOCK_K=64,
        DOT_F32=_dot_f32(x.dtype),
    )
    launch(_router_top1_kernel, (triton.cdiv(t, block_t),), args, {})
    return expert, score


@dataclass(frozen=True)
class Groups:
    """Rows in expert order (``tokens``: token id of each sorted row) and a table of row groups, one expert each."""

    tokens: torch.Tensor  # int32 [T]
    expert: torch.Tensor  # int32 [G]
    start: torch.Tensor  # int32 [G], index into tokens
    rows: torch.Tensor  # int32 [G], 0 for an unused slot


def _sort_by_expert(expert: torch.Tensor, num_experts: int):
    expert = expert.long()
    # scatter_add, not bincount: CUDA bincount reads the input's range back to the host (a sync; breaks graph capture)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert.device).scatter_add_(0, expert.long(), torch.ones_like(expert, dtype=torch.int64))
    tokens = torch.argsort(expert, stable=True)  # stable: tokens keep their order inside an expert
    offsets = torch.cumsum(counts, 0) - counts
    return counts, tokens.to(torch.int32), offsets


def decode_groups(expert: torch.Tensor, num_experts: int) -> Groups:
    """One group per selected expert (all its tokens); min(T, E) slots, selected experts first, ascending."""
    counts, tokens, offsets = _sort_by_expert(expert, num_experts)
    slots = min(expert.numel(), num_experts)
    # Stable sort of "count == 0" puts picked experts first without a device→host sync (no nonzero()).
    picked_first = torch.argsort((counts == 0).to(torch.int8), stable=True)[:slots]
    return Groups(tokens, picked_first.to(torch.int32), offsets[picked_first].to(torch.int32),
                  counts[picked_first].to(torch.int32))


def block_groups(expert: torch.Tensor, num_experts: int, block_m: int) -> Groups:
    """Groups of at most block_m rows, each inside one expert's run of sorted tokens (a padded block table).

    The table has the static upper bound cdiv(T, block_m) + min(T, E) entries; unused entries have 0 rows."""
    counts, tokens, offsets = _sort_by_expert(expert, num_experts)
    blocks = (counts + block_m - 1) // block_m
    blocks_end = torch.cumsum(blocks, 0)
    size = triton.cdiv(expert.numel(), block_m) + min(expert.numel(), num_experts)
    block = torch.arange(size, device=expert.device)
    owner = torch.searchsorted(blocks_end, block, right=True)  # first expert whose blocks end after this one
    used = owner < num_experts
    owner = owner.clamp(max=num_experts - 1)
    within = block - (blocks_end[owner] - blocks[owner])
    rows = (counts[owner] - within * block_m).clamp(0, block_m) * used
    start = torch.where(used, offsets[owner] + within * block_m, 0)
    return Groups(tokens, owner.to(torch.int32), start.to(torch.int32), rows.to(torch.int32))


def _weight_args(w: ExpertWeight, partner: ExpertWeight | None):
    """(format, weight, scales, weight strides, scale strides, padded K, quantization block) for the kernel."""
    if partner is not None:  # gate and up share one set of strides in the kernel
        same = (w.packed.stride() == partner.packed.stride() if isinstance(w, Int4Weight)
                else w.data.stride() == partner.data.stride())
        if not same:
            raise KernelError("gate and up weights have different memory layouts; make both contiguous")
    # Dense and FP8 have no quantization blocks: QBLOCK 32 is never read (and dense passes its data as "scales").
    if isinstance(w, DenseWeight):
        return DENSE, w.data, w.data, w.data.stride(), (0, 0, 0), w.shape[1], 32
    if isinstance(w, Fp8Weight):
        return FP8, w.data, w.scale, w.data.stride(), (w.scale.stride(0), 0, 0), w.shape[1], 32
    if isinstance(w, Int4Weight):
        e, n, half_k = w.packed.stride()
        return (INT4, w.packed, w.scales, (e, half_k, n), w.scales.stride(), w.padded_in_features, w.block)
    raise KernelError(f"unsupported expert weight type {type(w).__name__}")


def grouped_expert(a: torch.Tensor, groups: Groups, w1: ExpertWeight, out: torch.Tensor, tiles: Tiles, *,
                   w2: ExpertWeight | None = None, row_scale: torch.Tensor | None = None, gather_a: bool = False,
                   scatter_c: bool = False, residual: torch.Tensor | None = None, launch=run_kernel) -> torch.Tensor:
    """Launch ``_grouped_expert_kernel``: out[rows] = a[rows] @ w1[e] (or SwiGLU with w2 = up). Returns out."""
    fmt, w1_data, s1, w_strides, s_strides, k_padded, qblock = _weight_args(w1, w2)
    _, k, n = w1.shape
    if a.shape[-1] != k:
        raise KernelError(f"expert weight expects {k} input features, activations have {a.shape[-1]}")
    w2_data, s2 = (w1_data, s1) if w2 is None else _weight_args(w2, None)[1:3]
    # An INT4 K tile must sit inside one quantization block: the largest power of two dividing both (>= 32).
    block_k = math.gcd(tiles.block_k, qblock) if fmt == INT4 else tiles.block_k
    res = residual if residual is not None else out
    args = dict(
        a_ptr=a, stride_am=a.stride(0), stride_ak=a.stride(1), token_ptr=groups.tokens,
        row_scale_ptr=row_scale if row_scale is not None else a, group_expert_ptr=groups.expert,
        group_start_ptr=groups.start, group_rows_ptr=groups.rows, w1_ptr=w1_data, s1_ptr=s1, w2_ptr=w2_data, s2_ptr=s2,
        stride_we=w_strides[0], stride_wk=w_strides[1], stride_wn=w_strides[2],
        stride_se=s_strides[0], stride_sn=s_strides[1], stride_sk=s_strides[2],
        c_ptr=out, stride_cm=out.stride(0), stride_cn=out.stride(1), res_ptr=res, stride_rm=res.stride(0),
        stride_rn=res.stride(1), K=k, N=n, K_PADDED=k_padded,
        FORMAT=fmt, SWIGLU=w2 is not None, GATHER_A=gather_a, ROW_SCALE=row_scale is not None, SCATTER_C=scatter_c,
        ADD_RESIDUAL=residual is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k,
        QBLOCK=qblock, DOT_F32=_dot_f32(a.dtype), BF16_RNE_BY_HAND=INTERPRETED,
    )
    grid = (groups.expert.numel(), triton.cdiv(n, tiles.block_n))
    launch(_grouped_expert_kernel, grid, args, dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    return out


def moe_triton(x: torch.Tensor, weights: MoEWeights, path: str, tiles: Tiles | None = None,
               launch=run_kernel) -> torch.Tensor:
    """The MoE layer with Triton kernels. x [T, H] (bf16/fp16/fp32) → [T, H] in x.dtype. path: decode | prefill."""
    t, h = x.shape
    e = weights.num_experts
    out = torch.empty_like(x)
    if t == 0:
        return out
    expert, score = router_top1(x, weights.router, launch)
    everyone = torch.zeros(t, dtype=torch.int32, device=x.device)
    if path == "decode":
        tiles = tiles or DECODE_TILES
        block_m = min(max(tiles.block_m, triton.next_power_of_2(t)), DECODE_MAX_BLOCK_M)
        tiles = dataclasses.replace(tiles, block_m=block_m)
        routed, shared = decode_groups(expert, e), decode_groups(everyone, 1)
    elif path == "prefill":
        tiles = tiles or PREFILL_TILES
        routed, shared = block_groups(expert, e, tiles.block_m), block_groups(everyone, 1, tiles.block_m)
    else:
        raise KernelError(f"unknown Triton MoE path {path!r}; use 'decode' or 'prefill'")
    inter = weights.intermediate_size
    h_routed = grouped_expert(x, routed, weights.gate, x.new_empty(t, inter), tiles, w2=weights.up, row_scale=score,
                              gather_a=True, launch=launch)
    routed_out = grouped_expert(h_routed, routed, weights.down, torch.empty(t, h, dtype=torch.float32, device=x.device),
                                tiles, scatter_c=True, launch=launch)
    h_shared = grouped_expert(x, shared, weights.shared_gate, x.new_empty(t, inter), tiles, w2=weights.shared_up,
                              launch=launch)
    return grouped_expert(h_shared, shared, weights.shared_down, out, tiles, residual=routed_out, launch=launch)


_TRITON_POINTER_TYPES = {
    torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32", torch.uint8: "*u8",
    torch.float8_e4m3fn: "*fp8e4nv",
}


def compile_for_gpu(x: torch.Tensor, weights: MoEWeights, path: str, arch: int = 90,
                    tiles: Tiles | None = None) -> list[str]:
    """Compile (not run) every kernel a forward pass would launch, for NVIDIA sm_<arch>, on a machine without a GPU.

    Drives ``moe_triton`` on CPU tensors with a launcher that hands each kernel's real arguments to triton.compile, so
    a kernel that would not compile for the GPU fails here. Ints are compiled unspecialised (the JIT also specialises
    on divisibility by 16 and on the value 1). Returns one line per compiled kernel (name, cubin size, shared memory)."""
    if INTERPRETED:
        raise KernelError("compile_for_gpu needs the GPU compiler: unset TRITON_INTERPRET before importing triton_moe")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lines = []

    def compile_launch(kernel, grid, args, options):
        constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
        signature, constexprs = {}, {}
        for name in kernel.arg_names:
            value = args[name]
            if name in constexpr_names:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = _TRITON_POINTER_TYPES[value.dtype]
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k in ("FORMAT", "SWIGLU", "BLOCK_M", "BLOCK_N"))
        lines.append(f"{kernel.fn.__name__}[{flags}] sm_{arch}: {len(compiled.asm['cubin'])} B cubin, "
                     f"{compiled.metadata.shared} B shared memory")

    moe_triton(x, weights, path, tiles, launch=compile_launch)
    return lines
