"""Sibling projections as separate kernel calls vs one call over concatenated weights (graph_passes/sibling_projections.py).

    python benchmarks/sibling_projections.py [--rows 1 --rows 8 --rows 128] [--threads 2] [--copies 12] [--runs 200]

rand200m's groups (hidden 768): attention's q, k, v (768 × 768, 256, 256), the dense MLP's gate and up (2 × 768 × 2048)
and the shared expert's gate and up (2 × 768 × 1024), as 4-bit MatMulNBits (block 128, accuracy level 4: the int4
export's) and as fp32 MatMul. Each graph holds --copies distinct copies of the group (weights not all cache-resident,
as in a model) reading one input; the fused graph is the same graph after the pass. Reported: µs per group, median
of --runs session runs, both forms checked equal first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from llama4_export.graph_passes.lower_linears import ORT_DOMAIN, nbits_weight
from llama4_export.graph_passes.manager import PassContext
from llama4_export.graph_passes.quantize import initializer
from llama4_export.graph_passes.sibling_projections import fuse_sibling_projections

from moe_lowering import median_us, session  # benchmarks/, beside this script

from common import ArgumentParser, positive_int, print_machine, run_script, summary  # benchmarks/, beside this script

HIDDEN, BLOCK = 768, 128
GROUPS = {"q, k, v": (768, 256, 256), "gate, up": (2048, 2048), "shared gate, up": (1024, 1024)}


def group_graph(widths: tuple[int, ...], copies: int, int4: bool, rng: np.random.Generator) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["rows", HIDDEN]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21, ORT_DOMAIN: 1}, name="group")
    for c in range(copies):
        for i, n in enumerate(widths):
            name = f"c{c}.p{i}"
            if int4:
                q = rng.integers(-8, 8, (n, HIDDEN), dtype=np.int8)
                packed, scales = nbits_weight(q, rng.uniform(0.01, 0.1, (n, HIDDEN // BLOCK)).astype(np.float32), BLOCK, 4)
                inputs = [x, initializer(graph, f"{name}.nbits", packed), initializer(graph, f"{name}.scale", scales)]
                node = ir.Node(ORT_DOMAIN, "MatMulNBits", inputs, name=name, attributes=[
                    ir.AttrInt64("K", HIDDEN), ir.AttrInt64("N", n), ir.AttrInt64("bits", 4),
                    ir.AttrInt64("block_size", BLOCK), ir.AttrInt64("accuracy_level", 4)])
            else:
                weight = initializer(graph, f"{name}.w", rng.standard_normal((HIDDEN, n), dtype=np.float32) * 0.05)
                node = ir.Node("", "MatMul", [x, weight], name=name)
            node.outputs[0].name = f"{name}.y"
            node.outputs[0].type, node.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["rows", n])
            graph.append(node)
            graph.outputs.append(node.outputs[0])
    return ir.Model(graph, ir_version=10)


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--rows", type=positive_int, action="append", help="activation rows (tokens × sequences); default 1, 8, 128")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--copies", type=positive_int, default=12)
    parser.add_argument("--runs", type=positive_int, default=200)
    args = parser.parse_args()
    print_machine(args.threads)
    rng = np.random.default_rng(0)
    table = Table(title=f"µs per group of projections, {args.threads} threads, median of {args.runs} runs")
    for column in ("weights", "group", "rows", "separate calls", "one call", "separate / one"):
        table.add_column(column, justify="right" if column not in ("weights", "group") else "left")
    for int4 in (True, False):
        for group, widths in GROUPS.items():
            separate, fused = (group_graph(widths, args.copies, int4, np.random.default_rng(1)) for _ in range(2))
            fuse_sibling_projections(fused, PassContext("onnxruntime", "gather"))
            sessions = [session(ir.to_proto(m).SerializeToString(), args.threads) for m in (separate, fused)]
            for rows in args.rows or [1, 8, 128]:
                feed = {"x": rng.standard_normal((rows, HIDDEN), dtype=np.float32)}
                for a, b in zip(*(s.run(None, feed) for s in sessions)):
                    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
                us = [median_us(s, feed, args.runs) / args.copies for s in sessions]
                table.add_row("4-bit" if int4 else "fp32", group, str(rows), f"{us[0]:.1f}", f"{us[1]:.1f}",
                              f"{us[0] / us[1]:.2f}×")
    Console(width=120).print(table)


if __name__ == "__main__":
    run_script(main)
