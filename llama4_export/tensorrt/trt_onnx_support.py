"""What TensorRT's ONNX parser accepts: a data table for the conformance lint (lint.py).

Source: the operator support matrix of onnx-tensorrt, docs/operators.md, as published for **TensorRT 10.15**
("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"), and its changelog (10.15 added
RMSNormalization, RotaryEmbedding and TensorScatter). Only the operators marked supported (Y) are listed, each with the
data types of its main input as the matrix states them; the restrictions column is encoded where the lint can check
it statically (inputs that must be build-time constants). Transcribed by hand on 2026-11-23; when moving to a newer
TensorRT, update TENSORRT_VERSION, the opset range and the rows together from that release's operators.md.
"""

from __future__ import annotations

TENSORRT_VERSION = "10.15"
SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15 GA)"
OPSET_RANGE = (9, 24)

# Data types the parser knows (its "supported ONNX data types" line). DOUBLE is parsed but cast down to FLOAT, which a
# strongly typed network must not rely on, so the lint treats it as unsupported.
DATA_TYPES = ("FP32", "FP16", "BF16", "FP8", "FP4", "INT32", "INT64", "INT8", "INT4", "UINT8", "BOOL")
# Quantized types exist only as DequantizeLinear inputs / QuantizeLinear outputs (and constants feeding them).
QUANTIZED_TYPES = ("FP8", "FP4", "INT8", "INT4")

_F = "FP32 FP16 BF16"
_FI = f"{_F} INT32 INT64"
_FIB = f"{_FI} BOOL"

OPERATORS: dict[str, str] = {
    "Abs": _FI, "Acos": _F, "Acosh": _F, "Add": _FI, "And": "BOOL", "ArgMax": _FI, "ArgMin": _FI, "Asin": _F,
    "Asinh": _F, "Atan": _F, "Atanh": _F, "Attention": f"{_F} INT8 FP8", "AveragePool": _F, "BatchNormalization": _F,
    "BlackmanWindow": "FP32 FP16", "Cast": f"{_FI} UINT8 BOOL", "CastLike": f"{_FI} UINT8 BOOL", "Ceil": _F, "Celu": _F,
    "Clip": _F, "Concat": _FIB, "Constant": f"{_F} FP8 FP4 INT4 INT32 INT64 BOOL",
    "ConstantOfShape": f"{_F} FP8 FP4 INT4 INT32 INT64 BOOL", "Conv": _F, "ConvTranspose": _F, "Cos": _F, "Cosh": _F,
    "CumSum": _F, "DeformConv": "FP32 FP16", "DepthToSpace": _FI, "DequantizeLinear": "INT8 FP8 FP4 INT4", "Div": _FI,
    "Dropout": _F, "Einsum": _F, "Elu": _F, "Equal": _FI, "Erf": _F, "Exp": _F, "Expand": _FIB, "EyeLike": _FIB,
    "Flatten": _FIB, "Floor": _F, "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB, "Gelu": f"{_F} INT8 INT32 INT64",
    "Gemm": _F, "GlobalAveragePool": _F, "GlobalLpPool": _F, "GlobalMaxPool": _F, "Greater": _FI, "GreaterOrEqual": _FI,
    "GridSample": "FP32 FP16", "GroupNormalization": _F, "GRU": _F, "HammingWindow": "FP32 FP16", "HannWindow": "FP32 FP16",
    "HardSigmoid": _F, "HardSwish": _F, "Hardmax": _F, "Identity": _FIB, "If": _FIB, "ImageScaler": _F,
    "InstanceNormalization": _F, "IsInf": _F, "IsNaN": _FI, "LayerNormalization": _F, "LeakyRelu": _F, "Less": _FI,
    "LessOrEqual": _FI, "Log": _F, "LogSoftmax": _F, "Loop": _FIB, "LRN": _F, "LSTM": _F, "LpNormalization": _F,
    "LpPool": _F, "MatMul": _F, "Max": _FI, "MaxPool": _F, "Mean": f"{_F} FP8 INT32 INT64", "MeanVarianceNormalization": _F,
    "Min": _FI, "Mish": "FP32 FP16", "Mod": _FI, "Mul": _FI, "Neg": _FI, "NonMaxSuppression": "FP32 FP16",
    "NonZero": "FP32 FP16", "Not": "BOOL", "OneHot": _FIB, "Or": "BOOL", "Pad": _FI, "ParametricSoftplus": _F, "Pow": _FI,
    "PRelu": _F, "QuantizeLinear": _F, "RandomNormal": _F, "RandomNormalLike": _F, "RandomUniform": _F,
    "RandomUniformLike": _F, "Range": _FI, "Reciprocal": _F, "ReduceL1": _FI, "ReduceL2": _FI, "ReduceLogSum": _FI,
    "ReduceLogSumExp": _FI, "ReduceMax": _FI, "ReduceMean": _FI, "ReduceMin": _FI, "ReduceProd": _FI, "ReduceSum": _FI,
    "ReduceSumSquare": _FI, "Relu": _FI, "Reshape": _FIB, "Resize": _F, "ReverseSequence": _FIB, "RMSNormalization": _F,
    "RNN": _F, "RoiAlign": "FP32 FP16", "RotaryEmbedding": _F, "Round": _F, "STFT": "FP32", "ScaledTanh": _F, "Scan": _F,
    "Scatter": _FI, "ScatterElements": _FI, "ScatterND": _FI, "Selu": _F, "Shape": _FIB, "Shrink": _FI, "Sigmoid": _F,
    "Sign": _FI, "Sin": _F, "Sinh": _F, "Size": _FIB, "Slice": _FIB, "Softmax": _F, "Softplus": _F, "Softsign": _F,
    "SpaceToDepth": _FI, "Split": _FIB, "Sqrt": _F, "Squeeze": _FIB, "Sub": _FI, "Sum": _FI, "Tan": _F, "Tanh": _F,
    "TensorScatter": f"{_F} INT32", "ThresholdedRelu": _F, "Tile": _FIB, "TopK": _FI, "Transpose": _FIB, "Trilu": _FIB,
    "Unsqueeze": _FIB, "Upsample": _F, "Where": _FIB, "Xor": "BOOL",
}

# Restrictions column, the statically checkable part: input positions that must be build-time constants
# ("`axes` must be an initializer", "`K` input must be an initializer", "`axis` must be a build-time constant", ...).
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "CumSum": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "OneHot": (1,), "TopK": (1,),
    # Quantization scales and zero points: TensorRT builds Q/DQ scales into the engine.
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
}


def types_of(op_type: str) -> tuple[str, ...]:
    return tuple(OPERATORS[op_type].split())
