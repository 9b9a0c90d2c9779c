"""Stage 2: torch.export → ONNX graphs with an explicit KV cache (see io_spec for the interface)."""

from .onnx_export import DATA_FILE, DECODE, GRAPHS, OPSET, PREFILL, GraphIO, GraphSpec, export_graph, save_graphs
from .pipeline import DEFAULT_MAX_PREFILL, PRECISIONS, TARGET, ModelSource, export_artifact
from .tokenizer_files import byte_level_tokenizer, copy_tokenizer_files, write_byte_level_tokenizer

__all__ = [
    "DATA_FILE", "DECODE", "DEFAULT_MAX_PREFILL", "GRAPHS", "OPSET", "PRECISIONS", "PREFILL", "TARGET", "GraphIO",
    "GraphSpec", "ModelSource", "byte_level_tokenizer", "copy_tokenizer_files", "export_artifact", "export_graph",
    "save_graphs", "write_byte_level_tokenizer",
]
