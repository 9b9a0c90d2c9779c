"""Validate a Hugging Face Llama 4 checkpoint and print its architecture numbers without loading tensor data.

`python examples/inspect_checkpoint.py CHECKPOINT_DIR`
"""

import json
import sys

from llama4_export.model import summarize
from llama4_export.model.loader import check_checkpoint

index = check_checkpoint(sys.argv[1])  # names, shapes and dtypes of every tensor, from the safetensors headers
summary = summarize(index.config)
print(json.dumps({k: summary[k] for k in ("total_params", "active_params", "weight_bytes", "layer_kinds")}, indent=2))
print("stored dtypes:", index.stored_dtypes, f"({index.weight_file_bytes / 1e9:.2f} GB of weight files)")
