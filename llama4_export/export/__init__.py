"""Stage 3: a weight source → ONNX graphs with an explicit KV cache (model/io_spec.py): onnx_export.py traces decode and
prefill over a range of decoder layers on the meta device; writer.py writes them with their weights read from the
source, one tensor at a time, into one shared external-data file; tokenizer_files.py writes or copies (and checks)
the tokenizer files. The pipeline that strings the stages together is llama4_export/pipeline.py."""
