"""Export a model and generate from it with the Python API: `python examples/export_and_generate.py [CHECKPOINT_DIR]`.

Without an argument it uses the built-in scout-tiny preset (random weights, so the text is noise).
"""

import sys
import tempfile
from pathlib import Path

from llama4_export import api
from llama4_export.runtime import Generator

source = dict(checkpoint=Path(sys.argv[1])) if len(sys.argv) > 1 else dict(model="scout-tiny", seed=0)
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "artifact"
    result = api.export_model(out, target="onnxruntime", **source)
    print(result.accuracy_report)
    generator = Generator.load(out)
    result = generator.generate("The history of the city", max_new_tokens=32)
    print(result.token_ids)
    print(result.text)
