"""Export a model and generate from it with the Python API: `python examples/export_and_generate.py [CHECKPOINT_DIR]`.

Without an argument it uses the built-in scout-tiny preset (random weights, so the text is noise).
"""

import sys
import tempfile
from pathlib import Path

from llama4_export.export import ModelSource, export_artifact
from llama4_export.graph_passes import optimize_artifact
from llama4_export.runtime import Generator

source = ModelSource(checkpoint=Path(sys.argv[1])) if len(sys.argv) > 1 else ModelSource(preset="scout-tiny", seed=0)
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "artifact"
    export_artifact(out, source)
    optimize_artifact(out, "onnxruntime")
    generator = Generator.load(out)
    result = generator.generate("The history of the city", max_new_tokens=32)
    print(result.token_ids)
    print(result.text)
