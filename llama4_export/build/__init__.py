"""Stage 5: TensorRT — conformance lint (no TensorRT needed), engines, the MoE plugin, comparisons, reproducible rebuilds.

    violations = lint_artifact("out/scout-tiny-trt")                 # {graph file: [Violation]}, CI-safe
    manifest = build_engines("out/scout-tiny-trt", max_batch=4)      # needs TensorRT >= 10.7 + a GPU
    line = maybe_build_engines("out/scout-tiny-trt", require_engine=False)   # after `--target tensorrt` exports

See engine.py (builder settings, reproducibility), moe_plugin.py (the Hopper MoE plugin), lint.py and
trt_onnx_support.py (what is checked, against which TensorRT), profiles.py, compare.py, rebuild.py.
"""

from .engine import (INSTALL_HINT, build_engines, maybe_build_engines, missing_tensorrt_message, require_tensorrt,
                     tensorrt_problem)
from .errors import BuildError
from .lint import Violation, lint_artifact, lint_model
from .profiles import BuildLimits, ShapeRange, build_limits, engine_profiles

__all__ = [
    "INSTALL_HINT", "BuildError", "BuildLimits", "ShapeRange", "Violation", "build_engines", "build_limits",
    "engine_profiles", "lint_artifact", "lint_model", "maybe_build_engines", "missing_tensorrt_message",
    "require_tensorrt", "tensorrt_problem",
]
