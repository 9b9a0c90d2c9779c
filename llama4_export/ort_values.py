"""numpy ↔ OrtValue, float8 arrays included: the one conversion the runtime (its cache bindings) and the graph
passes' ONNX Runtime runs share. A leaf module (numpy and onnxruntime only), so running an artifact never loads the
exporter's stages."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

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


def array_of(value: ort.OrtValue) -> np.ndarray:
    """The numpy array of an OrtValue, float8 ones as their ml_dtypes type."""
    array = value.numpy()
    if value.data_type() == "tensor(float8e4m3fn)":  # handed back as its raw bytes
        import ml_dtypes

        array = array.view(ml_dtypes.float8_e4m3fn)
    return array
