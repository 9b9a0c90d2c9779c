"""Run an in-memory graph on ONNX Runtime's CPU EP: what the passes use to check a lowering and to verify a rewrite."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ..ort_values import array_of, ort_value


def run_onnxruntime(model: ir.Model, feeds: dict[str, np.ndarray], custom_op_library: str | None = None) -> dict[str, np.ndarray]:
    """Run `model` on ONNX Runtime's CPU EP (saved to a temp dir so external weights resolve); outputs by name.
    INT4 DequantizeLinear → MatMul runs with float activations (accuracy level 1): what the graph says and TensorRT's
    W4A16 computes, where ORT's default quantizes them to int8 (the runtime's speed choice, ~1 % on the logits)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if custom_op_library:
        options.register_custom_ops_library(custom_op_library)
    with tempfile.TemporaryDirectory(prefix="llama4-passes-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.data")
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run_with_ort_values(names, {k: ort_value(np.ascontiguousarray(v)) for k, v in feeds.items()})
        return {name: array_of(value) for name, value in zip(names, values)}
