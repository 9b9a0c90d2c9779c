"""Run an in-memory graph on ONNX Runtime's CPU EP: what the passes use to check a lowering and to verify a rewrite.
Also the one place numpy arrays become OrtValues, float8 ones included (the runtime binds its caches through it)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import onnx_ir as ir

# ONNX element types, by numpy dtype name, of the ml_dtypes arrays ORT's numpy conversion does not know ("Numpy_type
# 260 can't be converted to MLDataType" on onnxruntime 1.32): they are handed over as raw bytes with their ONNX type.
RAW_ONNX_ELEMENT_TYPES = {"float8_e4m3fn": 17}  # TensorProto.FLOAT8E4M3FN


def ort_value(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over `array`'s memory (no copy on CPU), float8 arrays included; they must be C-contiguous."""
    if array.dtype.name in RAW_ONNX_ELEMENT_TYPES:
        if not array.flags.c_contiguous:  # ORT reads the bytes in C order (the cache's buffers always are)
            raise ValueError(f"a {array.dtype} input of shape {list(array.shape)} is not C-contiguous")
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint8), RAW_ONNX_ELEMENT_TYPES[array.dtype.name])
    return ort.OrtValue.ortvalue_from_numpy(array)


def _numpy(value: ort.OrtValue) -> np.ndarray:
    array = value.numpy()
    if value.data_type() == "tensor(float8e4m3fn)":  # handed back as its raw bytes
        import ml_dtypes

        array = array.view(ml_dtypes.float8_e4m3fn)
    return array


def run_onnxruntime(model: ir.Model, feeds: dict[str, np.ndarray], custom_op_library: str | None = None) -> dict[str, np.ndarray]:
    """Run `model` on ONNX Runtime's CPU EP (saved to a temp dir so external weights resolve); outputs by name."""
    import onnx_ir as ir

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if custom_op_library:
        options.register_custom_ops_library(custom_op_library)
    with tempfile.TemporaryDirectory(prefix="llama4-passes-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.data")
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run_with_ort_values(names, {k: ort_value(np.ascontiguousarray(v)) for k, v in feeds.items()})
        return {name: _numpy(value) for name, value in zip(names, values)}
