"""Stage 6: TensorRT — conformance lint (no TensorRT needed), engines, the MoE plugin, profiles. See engine.py (builder
settings, reproducibility), moe_plugin.py (the Hopper MoE plugin), lint.py and trt_onnx_support.py (what is checked,
against which TensorRT), profiles.py; README.md says what is written to TensorRT's documentation and not yet run.

    violations = lint_artifact("out/scout-tiny-trt")                 # tensorrt.lint: {graph file: [Violation]}, CI-safe
    manifest = build_engines("out/scout-tiny-trt", max_batch=4)      # tensorrt.engine: needs TensorRT >= 10.7 + a GPU

This package file imports nothing: import the submodule you need.
"""
