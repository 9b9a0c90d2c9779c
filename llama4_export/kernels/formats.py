"""Expert weight formats for the MoE kernels, in pure torch (no Triton): bf16/fp16, INT4 blockwise, FP8 E4M3.

Every matrix is seen the way the checkpoint stores experts: W [K, N] used as ``x @ W`` (K = input/reduction dimension),
with a leading expert dimension E ([1, K, N] for the shared expert). The MoE container ``MoEWeights.from_checkpoint``
takes the checkpoint tensors as they are (experts ``gate_up`` [E, H, 2I] and ``down`` [E, I, H]; shared expert and router in
nn.Linear layout) and builds these views without copying dense weights.

INT4 layout (shared with the quantization stage): per expert, packed uint8 [N, Kp/2] with K contiguous; byte j of row n
holds k = 2j in its low nibble and k = 2j+1 in its high nibble; value = nibble - 8 (symmetric, implicit zero point 8, as
ONNX Runtime's MatMulNBits). Scales [N, Kp/block] (fp16 or fp32), one per block of ``block`` consecutive k.
Kp = K rounded up to a multiple of ``block``: the padding k in [K, Kp) holds nibble 8 (= 0), so a kernel may read whole
blocks and only has to mask the activations. ``block`` must be a multiple of 32 (the kernels split a K tile into even and
odd halves of at least 16 for ``tl.dot``).

FP8 layout: float8_e4m3fn weights in the [E, K, N] view, one fp32 scale per expert matrix (amax / 448), weight-only:
activations stay in bf16/fp16/fp32 and the kernel widens the weights in registers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import Llama4ExportError

INT4_ZERO_POINT = 8
INT4_MAX = 7  # symmetric: scale = amax / 7 keeps -amax..amax inside -7..7, nibble 0 (= -8) is never produced
FP8_E4M3_MAX = 448.0
FORMATS = ("bf16", "fp16", "int4", "fp8")


class KernelError(Llama4ExportError):
    """A kernel input (weight format, shape, dtype) is unsupported, or the requested kernel path cannot run here."""


def _to_device(obj, device):
    """A copy of a weight dataclass with every tensor field moved to ``device``."""
    moved = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in moved.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.to(device)
        elif dataclasses.is_dataclass(value):
            moved[name] = _to_device(value, device)
    return type(obj)(**moved)


def _check_block(block: int) -> None:
    if block < 32 or block % 32:
        raise KernelError(f"INT4 block size {block} is not a positive multiple of 32; use 32, 64, 128 (default) or 256")


@dataclass(frozen=True)
class DenseWeight:
    """bf16/fp16/fp32 weights, data [E, K, N] (any strides: the shared expert is a transposed view of nn.Linear)."""

    data: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    def dequantize(self, experts: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        data = self.data if experts is None else self.data[experts]
        return data.to(dtype)

    def split_n(self, n: int) -> tuple[DenseWeight, DenseWeight]:
        return DenseWeight(self.data[..., :n]), DenseWeight(self.data[..., n:])

    def bytes_per_expert(self) -> int:
        e, k, n = self.shape
        return k * n * self.data.element_size()


@dataclass(frozen=True)
class Int4Weight:
    """INT4 blockwise symmetric: packed uint8 [E, N, Kp/2], scales [E, N, Kp/block]; in_features = K (unpadded)."""

    packed: torch.Tensor
    scales: torch.Tensor
    in_features: int
    block: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.packed.shape[0], self.in_features, self.packed.shape[1])

    @property
    def padded_in_features(self) -> int:
        return self.packed.shape[-1] * 2

    def dequantize(self, experts: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed = self.packed if experts is None else self.packed[experts]
        scales = self.scales if experts is None else self.scales[experts]
        return dequantize_int4(packed, scales, self.in_features, self.block, dtype)

    def split_n(self, n: int) -> tuple[Int4Weight, Int4Weight]:
        head = Int4Weight(self.packed[:, :n], self.scales[:, :n], self.in_features, self.block)
        tail = Int4Weight(self.packed[:, n:], self.scales[:, n:], self.in_features, self.block)
        return head, tail

    def bytes_per_expert(self) -> int:
        _, n, half_k = self.packed.shape
        return n * half_k + n * self.scales.shape[-1] * self.scales.element_size()


@dataclass(frozen=True)
class Fp8Weight:
    """FP8 E4M3 weight-only: data float8_e4m3fn [E, K, N], scale fp32 [E]; weight = data * scale."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    def dequantize(self, experts: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        data = self.data if experts is None else self.data[experts]
        scale = self.scale if experts is None else self.scale[experts]
        return dequantize_fp8(data, scale, dtype)

    def split_n(self, n: int) -> tuple[Fp8Weight, Fp8Weight]:
        return Fp8Weight(self.data[..., :n], self.scale), Fp8Weight(self.data[..., n:], self.scale)

    def bytes_per_expert(self) -> int:
        e, k, n = self.shape
        return k * n + 4


ExpertWeight = DenseWeight | Int4Weight | Fp8Weight


def quantize_int4(w: torch.Tensor, block: int = 128, scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """w [E, K, N] (x @ W view) → Int4Weight. Round to nearest with the scale as stored (so dequantize is exact)."""
    _check_block(block)
    if w.dim() != 3:
        raise KernelError(f"quantize_int4 expects a weight [E, K, N], got shape {tuple(w.shape)}")
    e, k, n = w.shape
    padded_k = -(-k // block) * block
    rows = torch.zeros(e, n, padded_k, dtype=torch.float32, device=w.device)
    rows[:, :, :k] = w.transpose(1, 2).float()
    blocks = rows.view(e, n, padded_k // block, block)
    scales = (blocks.abs().amax(dim=-1) / INT4_MAX).to(scale_dtype)
    stored = scales.float()
    safe = torch.where(stored > 0, stored, torch.ones_like(stored))  # all-zero block: any scale gives nibble 8
    q = torch.round(blocks / safe[..., None]).clamp(-8, INT4_MAX).to(torch.int16) + INT4_ZERO_POINT
    q = q.view(e, n, padded_k).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return Int4Weight(packed.contiguous(), scales.contiguous(), k, block)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, in_features: int, block: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [E, N, Kp/2], scales [E, N, Kp/block] → W [E, K, N] in dtype (computed in fp32)."""
    low = (packed & 0x0F).to(torch.int16) - INT4_ZERO_POINT
    high = (packed >> 4).to(torch.int16) - INT4_ZERO_POINT
    q = torch.stack((low, high), dim=-1).flatten(-2).float()  # [E, N, Kp], k order restored
    w = q.view(*q.shape[:-1], -1, block) * scales.float()[..., None]
    return w.flatten(-2)[..., :in_features].transpose(-1, -2).to(dtype)


def quantize_fp8(w: torch.Tensor) -> Fp8Weight:
    """w [E, K, N] → Fp8Weight with one scale per expert matrix (amax / 448, 1 for an all-zero matrix)."""
    if w.dim() != 3:
        raise KernelError(f"quantize_fp8 expects a weight [E, K, N], got shape {tuple(w.shape)}")
    amax = w.float().abs().amax(dim=(1, 2))
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    data = (w.float() / scale[:, None, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(data, scale.contiguous())


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (data.float() * scale.float()[:, None, None]).to(dtype)


DENSE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _to_format(w: torch.Tensor, fmt: str, block: int, scale_dtype: torch.dtype) -> ExpertWeight:
    if fmt in DENSE_DTYPES:
        return DenseWeight(w.to(DENSE_DTYPES[fmt]))
    if fmt == "int4":
        return quantize_int4(w, block, scale_dtype)
    if fmt == "fp8":
        return quantize_fp8(w)
    raise KernelError(f"unknown MoE weight format {fmt!r}; use one of {', '.join(FORMATS)} (or fp32)")


@dataclass(frozen=True)
class MoEWeights:
    """One Llama 4 MoE layer: router [E, H] (unquantized) + routed experts + shared expert, all as x @ W [E, K, N]."""

    router: torch.Tensor
    gate: ExpertWeight  # [E, H, I]
    up: ExpertWeight  # [E, H, I]
    down: ExpertWeight  # [E, I, H]
    shared_gate: ExpertWeight  # [1, H, I]
    shared_up: ExpertWeight  # [1, H, I]
    shared_down: ExpertWeight  # [1, I, H]
    weight_format: str

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.router.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[2]

    @classmethod
    def from_checkpoint(cls, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, shared_gate: torch.Tensor,
                        shared_up: torch.Tensor, shared_down: torch.Tensor, weight_format: str = "bf16", block: int = 128,
                        scale_dtype: torch.dtype = torch.float16) -> MoEWeights:
        """Checkpoint tensors (router.weight, experts.gate_up_proj, experts.down_proj, shared_expert.*.weight) →
        weights in ``weight_format``. The router is never quantized: own dtype for int4/fp8, the format's for bf16/fp16."""
        e, h = router.shape
        inter = shared_gate.shape[0]
        expected = {
            "experts.gate_up_proj": (gate_up, (e, h, 2 * inter)), "experts.down_proj": (down, (e, inter, h)),
            "shared_expert.gate_proj.weight": (shared_gate, (inter, h)),
            "shared_expert.up_proj.weight": (shared_up, (inter, h)),
            "shared_expert.down_proj.weight": (shared_down, (h, inter)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise KernelError(f"MoE tensor {name} has shape {tuple(tensor.shape)}, expected {shape} for router "
                                  f"[{e}, {h}] and shared_expert.gate_proj [{inter}, {h}]: check the checkpoint layer")
        # Expert gate and up are one checkpoint matrix: quantize them together (one FP8 scale per expert matrix).
        gate, up = _to_format(gate_up, weight_format, block, scale_dtype).split_n(inter)
        if weight_format in DENSE_DTYPES:
            router = router.to(DENSE_DTYPES[weight_format])
        return cls(
            router=router, gate=gate, up=up, down=_to_format(down, weight_format, block, scale_dtype),
            shared_gate=_to_format(shared_gate.T[None], weight_format, block, scale_dtype),
            shared_up=_to_format(shared_up.T[None], weight_format, block, scale_dtype),
            shared_down=_to_format(shared_down.T[None], weight_format, block, scale_dtype),
            weight_format=weight_format,
        )

    def to(self, device: torch.device | str) -> MoEWeights:
        return _to_device(self, device)

    def bytes_read(self, num_selected_experts: int) -> int:
        """Weight bytes a forward pass must read when ``num_selected_experts`` distinct experts were picked."""
        per_expert = self.gate.bytes_per_expert() + self.up.bytes_per_expert() + self.down.bytes_per_expert()
        shared = (self.shared_gate.bytes_per_expert() + self.shared_up.bytes_per_expert()
                  + self.shared_down.bytes_per_expert())
        return num_selected_experts * per_expert + shared + self.router.numel() * self.router.element_size()
