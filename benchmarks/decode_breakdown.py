"""Where a one-sequence decode step's time goes, and how fast its quantized matmuls read their weights in place.

    python benchmarks/decode_breakdown.py ARTIFACT [--prompt 32] [--tokens 128] [--threads 2] [--repeats 9]

Rows: the artifact's decode graph as exported, then copies with one group of its MatMulNBits replaced — lm_head, the
routed experts (the nodes inside the experts' Ifs), the other linears, and all of them — by the cheapest op of the
same output shape, Expand(Slice(x, first column), [N]): a vectorized fill of ≈ 1 µs (ONNX Runtime's Gather would not
do: ≈ 8 ns per gathered element, 250 µs for lm_head's 32,000 columns). Each row runs in the same runtime (Generator,
in-place cache, greedy). A group's share of the step is its row's difference from the first; divided into the bytes
its nodes read per step (their weight, scale and zero-point initializers; of the routed experts only the top-k that
run) it gives the read rate the kernel reaches inside the graph, to set against the machine's copy bandwidth. Plus the
Python share of a step (time outside `run_with_iobinding`). Single-part artifacts whose graphs fit in one protobuf
(each copy embeds its weights). Median of --repeats generations, rows interleaved.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from op_profile import single_part

from llama4_export.evaluation.bench import initializer_bytes, memory_bandwidth_gb_s
from llama4_export.runtime import Generator, OrtBackend

from common import (  # benchmarks/, beside this script
    ArgumentParser, BenchmarkError, existing_dir, positive_int, print_machine, run_script, summary, two_or_more)


def matmul_group(node: onnx.NodeProto, depth: int) -> str:
    """The group a MatMulNBits belongs to: the routed experts live in the Ifs' branches (depth > 0)."""
    if depth > 0:
        return "routed experts"
    return "lm_head" if node.name.startswith("lm_head.") else "other linears"


def graphs_deepest_first(graph: onnx.GraphProto, depth: int = 0) -> list[tuple[onnx.GraphProto, int]]:
    """(graph, depth) of `graph` and every subgraph in it, deepest first: a rewrite that rebuilds a graph's node list
    copies its nodes' subgraphs, so these must be rewritten before it."""
    found = [(graph, depth)]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found += graphs_deepest_first(attribute.g, depth + 1)
    return sorted(found, key=lambda item: -item[1])


def without_matmuls(model: onnx.ModelProto, group: str | None) -> int:
    """Replace the MatMulNBits of `group` (None: all) by Expand(Slice(x, [0:1] of the last axis), [N]): the same
    output shape [.., N], with no weight read. Returns how many were replaced."""
    constants: dict[str, onnx.TensorProto] = {}

    def constant(name: str, values: list[int]) -> str:
        constants.setdefault(name, numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    count = 0
    for graph, depth in graphs_deepest_first(model.graph):
        nodes = []
        for node in graph.node:
            if node.op_type != "MatMulNBits" or group not in (None, matmul_group(node, depth)):
                nodes.append(node)
                continue
            columns = {a.name: a.i for a in node.attribute}["N"]
            first = f"{node.name}.decode_breakdown.first_column"
            nodes.append(helper.make_node("Slice", [node.input[0], constant("decode_breakdown.zero", [0]),
                                                    constant("decode_breakdown.one", [1]),
                                                    constant("decode_breakdown.last_axis", [-1])], [first],
                                          name=first))
            nodes.append(helper.make_node("Expand", [first, constant(f"decode_breakdown.columns_{columns}", [columns])],
                                          [node.output[0]], name=f"{node.name}.decode_breakdown.fill"))
            count += 1
        del graph.node[:]
        graph.node.extend(nodes)
    model.graph.initializer.extend(constants.values())
    return count


def step_ms(generator: Generator, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(ms per decode step, ms of it outside ONNX Runtime's run) between the first and the last of `tokens` streamed
    tokens of one greedy generation."""
    inside = [0.0]
    run = ort.InferenceSession.run_with_iobinding

    def timed(session, *args, **kwargs):
        start = time.perf_counter()
        result = run(session, *args, **kwargs)
        inside[0] += time.perf_counter() - start
        return result

    stamps: list[tuple[float, float]] = []
    ort.InferenceSession.run_with_iobinding = timed
    try:
        generator.generate(prompt, max_new_tokens=tokens, stop_tokens=[],
                           stream=lambda event: stamps.append((time.perf_counter(), inside[0])))
    finally:
        ort.InferenceSession.run_with_iobinding = run
    (start, ort_start), (end, ort_end) = stamps[0], stamps[-1]
    steps = len(stamps) - 1
    return (end - start) / steps * 1e3, ((end - start) - (ort_end - ort_start)) / steps * 1e3


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("artifact", type=existing_dir,
                        help="a single-part 4-bit artifact directory (MatMulNBits in its decode graph)")
    parser.add_argument("--prompt", type=positive_int, default=32,
                        help="prompt length in tokens before the timed decode (default %(default)s)")
    parser.add_argument("--tokens", type=two_or_more, default=128,
                        help="tokens decoded per timed run (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="ONNX Runtime intra-op threads (default %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=9,
                        help="timed runs per row, interleaved; the median is reported (default %(default)s)")
    args = parser.parse_args()

    config, exported, max_prefill = single_part(args.artifact)
    graph = onnx.load(str(exported.decode), load_external_data=False).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}  # the experts' too: declared at the top
    read_per_step: dict[str | None, float] = {}
    for subgraph, depth in graphs_deepest_first(graph):
        for node in subgraph.node:
            if node.op_type != "MatMulNBits":
                continue
            group = matmul_group(node, depth)
            share = config.num_experts_per_tok / config.num_local_experts if group == "routed experts" else 1.0
            read = sum(initializer_bytes(weights[name]) for name in node.input[1:] if name in weights) * share
            for key in (group, None):
                read_per_step[key] = read_per_step.get(key, 0.0) + read
    if not read_per_step:
        raise BenchmarkError(f"{args.artifact}: its decode graph has no MatMulNBits to replace; give a 4-bit artifact "
                             "(llama4-export --precision int4)")
    groups = sorted(key for key in read_per_step if key is not None) + [None]
    rows = {"as exported": (exported, None)}
    with tempfile.TemporaryDirectory() as scratch:
        for group in groups:
            model = onnx.load(str(exported.decode))  # with its weights: the copy must not point back at model.data
            replaced = without_matmuls(model, group)
            path = Path(scratch) / f"{len(rows)}.onnx"
            onnx.save(model, str(path))
            rows[f"without {group or 'every MatMulNBits'} ({replaced})"] = (dataclasses.replace(exported, decode=path),
                                                                             group or "all")
        generators = {label: Generator.for_backend(OrtBackend([graphs], config, max_prefill, args.threads), args.artifact)
                      for label, (graphs, _) in rows.items()}
        prompt = np.random.default_rng(0).integers(0, config.vocab_size, args.prompt).tolist()
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in generators}
        bandwidth = [print_machine(args.threads)]
        for generator in generators.values():  # warm-up: ORT's first runs allocate and pre-pack
            generator.generate(prompt, max_new_tokens=8, stop_tokens=[])
        for _ in range(args.repeats):
            for label, generator in generators.items():
                times[label].append(step_ms(generator, prompt, args.tokens))
        bandwidth.append(memory_bandwidth_gb_s(args.threads))
    print(f"copy bandwidth {bandwidth[0]:.1f} GB/s before, {bandwidth[1]:.1f} after")
    print(f"{args.artifact.name}: one-sequence decode step after a {args.prompt}-token prompt, {args.threads} threads, "
          f"median of {args.repeats} × {args.tokens} tokens")
    exported_ms = float(np.median([m[0] for m in times["as exported"]]))
    for label, measured in times.items():
        step, python = (float(np.median([m[k] for m in measured])) for k in (0, 1))
        line = f"  {label:38s} {step:6.3f} ms per token (Python outside ONNX Runtime {python:5.3f} ms)"
        group = rows[label][1]
        if group is not None:
            saved, read = exported_ms - step, read_per_step[None if group == "all" else group]
            rate = f"{read / saved / 1e6:5.1f} GB/s" if saved > 0 else "no saving measured: below the noise"
            line += f"; replaced {saved:6.3f} ms for {read / 1e6:5.1f} MB: {rate}"
        print(line)


if __name__ == "__main__":
    run_script(main)
