"""Small helpers the rules' checks share: constants, attributes of the node producing a value, static shapes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or Constant node), or None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        tensor = attr.value if attr is not None else None
    return None if tensor is None else tensor.numpy()


def const_equals(value: ir.Value | None, expected) -> bool:
    array = const(value)
    return array is not None and array.shape == np.shape(expected) and bool(np.all(array == np.asarray(expected)))


def attr(value: ir.Value, name: str, default=None):
    """Attribute `name` of the node that produces `value` (its default when absent)."""
    found = value.producer().attributes.get(name)
    return default if found is None else found.value


def dims(value: ir.Value | None) -> list | None:
    """The value's dims (ints for static sizes, None for symbolic ones), or None when the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape.dims]


def is_weight(value: ir.Value | None, rank: int) -> bool:
    """An initializer of the given rank."""
    return value is not None and value.is_initializer() and value.const_value is not None and len(value.shape) == rank


def is_linear(value: ir.Value) -> bool:
    """value = Gemm(x, W) computing x @ W.T exactly: transB=1, transA=0, alpha=beta=1, no bias."""
    node = value.producer()
    return (
        node is not None and node.op_type == "Gemm" and len(node.inputs) == 2
        and attr(value, "transA", 0) == 0 and attr(value, "transB", 0) == 1
        and attr(value, "alpha", 1.0) == 1.0 and attr(value, "beta", 1.0) == 1.0
    )


def last_axis(value: ir.Value, axis) -> bool:
    """`axis` (an int, or a one-element constant) names the last axis of `value`."""
    rank = len(value.shape) if value.shape is not None else None
    if isinstance(axis, ir.Value):
        array = const(axis)
        if array is None or array.size != 1:
            return False
        axis = int(array.reshape(-1)[0])
    return rank is not None and axis in (-1, rank - 1)
