"""The command lines, thin layers over the Python API: `llama4-export` (export.py, over api.py) and `llama4-run`
(run.py, over the runtime alone, so running an artifact loads neither torch nor the exporter)."""
