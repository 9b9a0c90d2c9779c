"""A backend for partitioned artifacts (export/partitions.py): one ONNX Runtime session pair per layer range, run in
order, hidden states handed from each part to the next. Part k gets device k when the CUDA EP is available (its own
weights and, through its own cache inputs, its own KV cache); on CPU every part runs on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import read_manifest
from ..export import io_spec
from ..export.partitions import HIDDEN_IN, part_output_names
from ..model.config import Llama4Config
from .backends import StepOutput, default_providers
from .errors import GenerationError
from .kv_cache import SlidingKVCache

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class PartitionedOrtBackend:
    name = "onnxruntime"

    def __init__(self, directory: Path, manifest: dict, config: Llama4Config, threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        self.config = config
        self.required_slots: dict[str, int] = {}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        base = providers or default_providers()
        self.parts = []
        for index, entry in enumerate(manifest["partitions"]):
            layers = range(*entry["layers"])
            part_dir = Path(directory) / entry["directory"]
            graphs = read_manifest(part_dir, verify=False)["graphs"]
            placed = [("CUDAExecutionProvider", {"device_id": index}) if p == "CUDAExecutionProvider" else p for p in base]
            sessions = {}
            for name in ("decode", "prefill"):
                path = part_dir / graphs[name]["file"]
                try:
                    sessions[name] = ort.InferenceSession(str(path), sess_options=options, providers=placed)
                except Exception as exc:  # ORT raises its own exception types for unreadable models
                    raise GenerationError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]}); re-run the export") from None
            self.parts.append((layers, sessions, part_output_names(config, layers)))
            self.max_prefill_tokens = int(graphs["prefill"]["max_new_tokens"])
        first_layers, first_sessions, _ = self.parts[0]
        key_type = {i.name: i.type for i in first_sessions["decode"].get_inputs()}[io_spec.past_key(first_layers.start)]
        if key_type not in _ORT_TYPES:
            raise GenerationError(f"{directory}: cache type {key_type} is not supported by the numpy runtime (float32, float16)")
        self.cache_dtype = np.dtype(_ORT_TYPES[key_type])
        covered = [i for layers, _, _ in self.parts for i in layers]
        if covered != list(range(config.num_hidden_layers)):
            raise GenerationError(f"{directory}: the partitions cover layers {covered[:3]}…, not 0..{config.num_hidden_layers - 1} in order; re-run the export")

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache) -> StepOutput:
        graph = "decode" if input_ids.shape[1] == 1 else "prefill"
        n = self.config.num_hidden_layers
        keys, values = [None] * n, [None] * n
        x = input_ids
        for layers, sessions, output_names in self.parts:
            feeds = {io_spec.INPUT_IDS if layers.start == 0 else HIDDEN_IN: x, io_spec.POSITIONS: positions}
            feeds.update({io_spec.PAST_POSITIONS[k]: p for k, p in cache.positions.items()})
            for i in layers:
                feeds[io_spec.past_key(i)], feeds[io_spec.past_value(i)] = cache.keys[i], cache.values[i]
            out = sessions[graph].run(output_names, feeds)
            x = out[0]
            for j, i in enumerate(layers):
                keys[i], values[i] = out[1 + 2 * j], out[2 + 2 * j]
        return StepOutput(x, keys, values)

