"""The pass manager: named passes over an in-memory onnx_ir model, with an op histogram before/after each.

A pass is a small named rewrite (`GraphPass`): its function's docstring says "pattern → replacement", `requires`
names the properties earlier passes must have produced (e.g. MoE fusion needs the canonical form), `produces` the
ones it establishes. `run_passes` checks that ordering, records per pass how many rewrites it made and the op-type
histogram before and after, and — given a `Verifier` — runs ONNX Runtime on sample inputs after every pass to prove
the graph's outputs did not move beyond the stated tolerance (verify.py).
"""

from __future__ import annotations

import collections
import gc
from dataclasses import dataclass, field
from typing import Callable

import onnx_ir as ir

from .errors import GraphPassError


@dataclass
class PassContext:
    """What a pass may need to know beyond the graph: the target, the MoE form for standard-op lowerings."""

    target: str
    moe_form: str  # "gather" (decode: read only the selected expert) or "dense" (prefill: every expert, traceable)
    use_trt_plugin: bool = True
    moe_lowering: str | None = None  # what the MoE became (set by the lowering pass)
    notes: list[str] = field(default_factory=list)  # decisions worth reporting (e.g. why ORT's MoE op was not used)
    quantization: object | None = None  # quantize.QuantSpec when quantizing (the quantize passes read it)
    attention_chunk: int | None = None  # the model's attention chunk: the slots a chunked layer's cache holds


@dataclass(frozen=True)
class GraphPass:
    name: str
    apply: Callable[[ir.Model, PassContext], int]  # rewrites the model in place, returns the number of rewrites
    requires: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        """The rule in one line: "pattern → replacement"."""
        lines = (self.apply.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""


def op_histogram(model: ir.Model) -> collections.Counter:
    """Node count per op type ("domain::Op" outside the default ONNX domain), subgraphs included."""
    counts: collections.Counter = collections.Counter()
    for node in model.graph.all_nodes():
        counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
    return counts


@dataclass
class PassRecord:
    name: str
    doc: str
    rewrites: int
    before: collections.Counter
    after: collections.Counter
    deviation: float | None = None  # max |out - reference| / max |reference| over all outputs, when verified
    worst_output: str | None = None

    @property
    def changes(self) -> dict[str, int]:
        """Op types whose count changed, sorted by name: {op: after - before}."""
        ops = sorted(set(self.before) | set(self.after))
        return {op: self.after[op] - self.before[op] for op in ops if self.after[op] != self.before[op]}

    def to_json(self, measured: bool = False) -> dict:
        record = {"pass": self.name, "rule": self.doc, "rewrites": self.rewrites,
                  "nodes_before": sum(self.before.values()), "nodes_after": sum(self.after.values()),
                  "op_changes": self.changes}
        if self.deviation is not None:
            record["verified"] = True
            if measured:
                record["max_deviation"], record["worst_output"] = self.deviation, self.worst_output
        return record


@dataclass
class PassReport:
    """Everything one `optimize` call did to one graph."""

    target: str
    records: list[PassRecord]
    before: collections.Counter
    after: collections.Counter
    tolerance: float | None = None  # set when verified
    moe_lowering: str | None = None
    notes: list[str] = field(default_factory=list)
    main_graph_nodes: tuple[int, int] = (0, 0)  # before, after: what runs every step (an If's branch runs when taken)

    @property
    def max_deviation(self) -> float | None:
        values = [r.deviation for r in self.records if r.deviation is not None]
        return max(values) if values else None

    def to_json(self, measured: bool = False) -> dict:
        """A summary; deterministic unless `measured` adds the deviations verify mode measured (they vary by machine)."""
        report = {
            "target": self.target,
            "passes": [r.to_json(measured) for r in self.records],
            "ops_before": dict(sorted(self.before.items())),
            "ops_after": dict(sorted(self.after.items())),
            "nodes_before": sum(self.before.values()),
            "nodes_after": sum(self.after.values()),
            "main_graph_nodes_before": self.main_graph_nodes[0],
            "main_graph_nodes_after": self.main_graph_nodes[1],
            "moe_lowering": self.moe_lowering,
            "notes": self.notes,
        }
        if self.tolerance is not None:
            report["verified_tolerance"] = self.tolerance
        return report


COLLECT_FROM_BYTES = 256 << 20  # weights in a graph from which run_passes collects garbage after every pass


def run_passes(model: ir.Model, passes: list[GraphPass], context: PassContext, verifier=None) -> PassReport:
    """Apply `passes` in order to `model` (in place); with a verifier, check the outputs after each pass."""
    produced: set[str] = set()
    records = []
    # What a pass removes (nodes, initializers and the tensors they hold) stays reachable through the ir objects'
    # references to each other (a value lists the nodes that use it), so only the cyclic collector frees it, and with
    # a graph's many live objects its full collections almost never run: a streamed Scout-shape int4 export piled up
    # dead weights to a 6.8 GB peak RSS without collecting after each pass, 2.8 GB with it (~2 % of its time). A
    # collection costs ~0.4 s in a process holding torch, so small graphs, whose dead tensors don't matter, skip it.
    collect = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None) \
        >= COLLECT_FROM_BYTES
    start, main_start = op_histogram(model), len(model.graph)
    for graph_pass in passes:
        missing = [p for p in graph_pass.requires if p not in produced]
        if missing:
            raise GraphPassError(f"pass {graph_pass.name!r} needs {', '.join(missing)} from an earlier pass; fix the pass order")
        before = op_histogram(model)
        rewrites = graph_pass.apply(model, context)
        if collect:
            gc.collect()
        record = PassRecord(graph_pass.name, graph_pass.doc, rewrites, before, op_histogram(model))
        if verifier is not None:
            record.deviation, record.worst_output = verifier.check(model, graph_pass.name)
        records.append(record)
        produced.update(graph_pass.produces)
    return PassReport(context.target, records, start, op_histogram(model),
                      tolerance=verifier.tolerance if verifier is not None else None,
                      moe_lowering=context.moe_lowering, notes=list(context.notes),
                      main_graph_nodes=(main_start, len(model.graph)))


def report_tables(graph: str, report: dict, top: int = 12) -> list:
    """rich renderables for one graph's report (PassReport.to_json form): the passes, the op counts before → after, and
    the main graph's node count where If branches make the totals differ from what a step runs."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    verified = report.get("verified_tolerance")
    passes = Table(title=f"{graph}: passes for {report['target']}" + (f" (verified, tolerance {verified:g})" if verified else ""))
    for column in ("pass", "rewrites", "nodes", "op changes", "max dev"):
        passes.add_column(column, justify="right" if column in ("rewrites", "nodes", "max dev") else "left")
    for record in report["passes"]:
        changes = ", ".join(f"{op} {delta:+d}" for op, delta in sorted(record["op_changes"].items(), key=lambda kv: kv[1]))
        deviation = record.get("max_deviation")
        passes.add_row(escape(record["pass"]), str(record["rewrites"]), f"{record['nodes_before']} → {record['nodes_after']}",
                       escape(changes) or "—", "—" if deviation is None else f"{deviation:.1e}")
    ops = Table(title=f"{graph}: op counts {report['nodes_before']} → {report['nodes_after']} (MoE: {report.get('moe_lowering')})")
    ops.add_column("op")
    ops.add_column("before", justify="right")
    ops.add_column("after", justify="right")
    before, after = report["ops_before"], report["ops_after"]
    ranked = sorted(set(before) | set(after), key=lambda op: (-max(before.get(op, 0), after.get(op, 0)), op))
    for op in ranked[:top]:
        ops.add_row(op, str(before.get(op, 0)), str(after.get(op, 0)))
    if len(ranked) > top:
        rest = ranked[top:]
        ops.add_row(f"({len(rest)} more)", str(sum(before.get(o, 0) for o in rest)), str(sum(after.get(o, 0) for o in rest)))
    shown = [passes, ops]
    if report.get("main_graph_nodes_after", report["nodes_after"]) != report["nodes_after"]:
        shown.append(Text(f"{graph}: main graph {report['main_graph_nodes_before']} → {report['main_graph_nodes_after']} "
                          "nodes; the counts above include the If branches, of which a step runs only those it takes"))
    return shown
