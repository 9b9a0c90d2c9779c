"""The Llama 4 MoE as a TensorRT plugin (tensorrt.plugin, TensorRT >= 10.7) running our Triton kernels.

TensorRT's own IMoELayer is Blackwell-only (DESIGN.md §5); on Hopper and smaller GPUs the tensorrt lowering writes a
`Llama4MoEPlugin` node (graph_passes/trt_plugin_spec.py) and this module registers the plugin it resolves to:

  plugin id   "llama4_export::Llama4MoEPlugin" (namespace::name, the node's plugin_namespace attribute and op type)
  inputs      x [N, H] and the six weights in checkpoint layout (trt_plugin_spec.PLUGIN_INPUTS), one float type
  attributes  num_experts (int), top_k (int, 1), activation (str, "swiglu") — trt_plugin_spec.PLUGIN_FIELDS
  output      [N, H], x's type and shape
  impl        (JIT) the weights become a kernels.MoEWeights view (no copy for dense weights) and kernels.moe_forward
              runs the Triton decode/prefill path on TensorRT's stream.

No aot_impl: tensorrt.plugin.aot_impl describes exactly one kernel launch (kernel name, PTX, launch parameters as
symbolic expressions of the input shapes), but this MoE is a router kernel, a grouping of tokens by expert in torch
(scatter_add histogram + stable argsort on the device, no host round trip), and four
grouped-GEMM launches driven by that grouping. An AOT form needs a single fused, persistent kernel that does the
grouping itself; until then engines with this plugin need Python (and torch, triton) in the process that runs them,
and their decode step is not CUDA-graph captured (runtime/trt_backend.py). C++ deployment: use --trt-fallback
(standard-op MoE), or TensorRT's IMoELayer on Blackwell.

Everything here except `register()` imports without TensorRT, so the lint and the tests can read the plugin's
declared attributes (`plugin_attribute_types`) from the very descriptor function TensorRT is given.
"""

from __future__ import annotations

import inspect

from ..graph_passes import trt_plugin_spec as spec
from .errors import BuildError

PLUGIN_ID = f"{spec.PLUGIN_NAMESPACE}::{spec.PLUGIN_NAME}"


def moe_descriptor(x, router, gate_up, down, shared_gate, shared_up, shared_down, num_experts: int, top_k: int,
                   activation: str):
    """Output descriptor: like x (shape [N, H], same type). Parameter names and annotations are the plugin's fields."""
    return x.like()


def moe_impl(x, router, gate_up, down, shared_gate, shared_up, shared_down, num_experts: int, top_k: int,
             activation: str, outputs, stream: int) -> None:
    """Run the MoE with the Triton kernels on TensorRT's CUDA stream, writing outputs[0] in place."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    tensors = [torch.as_tensor(t, device=device) for t in (x, router, gate_up, down, shared_gate, shared_up, shared_down)]
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        moe_compute(*tensors, out=torch.as_tensor(outputs[0], device=device))


def moe_compute(x, router, gate_up, down, shared_gate, shared_up, shared_down, out) -> None:
    """The plugin's body on torch tensors (any device): out[:] = Llama4 MoE(x) through kernels.moe_forward."""
    from ..kernels import MoEWeights, moe_forward

    weights = MoEWeights.from_checkpoint(router, gate_up, down, shared_gate, shared_up, shared_down,
                                         weight_format=_weight_format(x.dtype))
    out.copy_(moe_forward(x, weights))


def _weight_format(dtype) -> str:
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def plugin_attribute_types() -> dict[str, type]:
    """{attribute: int | str} as the registered descriptor declares them (parameters after the tensor inputs)."""
    params = list(inspect.signature(moe_descriptor).parameters.values())[len(spec.PLUGIN_INPUTS):]
    named = {"int": int, "str": str}  # annotations are strings here (from __future__ import annotations)
    return {p.name: named.get(p.annotation, p.annotation) for p in params}


_registered = False


def register() -> str:
    """Register the plugin with TensorRT (idempotent); returns its id. Needs tensorrt >= 10.7, torch and triton."""
    global _registered
    import tensorrt.plugin as trtp

    if not _registered:
        if plugin_attribute_types() != spec.PLUGIN_FIELDS:
            raise BuildError(f"plugin {PLUGIN_ID} declares {plugin_attribute_types()} but the graph passes write "
                             f"{spec.PLUGIN_FIELDS}; update moe_plugin.py and trt_plugin_spec.py together")
        trtp.register(PLUGIN_ID)(_annotated(moe_descriptor, trtp.TensorDesc, trtp.TensorDesc))
        trtp.impl(PLUGIN_ID)(_annotated(moe_impl, trtp.Tensor, None))
        _registered = True
    return PLUGIN_ID


def _annotated(function, tensor_type, return_type):
    """`function` with its tensor parameters annotated as tensor_type (tensorrt.plugin validates the annotations)."""
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)

    signature = inspect.signature(function)
    params = [p.replace(annotation=tensor_type) if p.name in spec.PLUGIN_INPUTS else p
              for p in signature.parameters.values()]
    types = plugin_attribute_types()
    params = [p.replace(annotation=types[p.name]) if p.name in types else p for p in params]
    if function is moe_impl:
        import typing

        params = [p.replace(annotation=typing.Tuple[tensor_type]) if p.name == "outputs" else
                  p.replace(annotation=int) if p.name == "stream" else p for p in params]
    wrapper.__signature__ = signature.replace(parameters=params, return_annotation=return_type or inspect.Signature.empty)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    if return_type is not None:
        wrapper.__annotations__["return"] = return_type
    wrapper.__name__, wrapper.__doc__ = function.__name__, function.__doc__
    return wrapper
