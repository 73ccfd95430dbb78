"""What the passes do to a model's graph, as a typed report (the ``cachedit-fx diff`` command).

:func:`describe` captures the graph the backend would see (with the islands enable_cache makes), runs the
pass pipeline on it and records the chain found, its Fn | middle | Bn cut, the carried tensors, the
inserted nodes and the state. ``render.py`` draws it; ``GraphReport.to_dict`` is its JSON form.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ..capture import islands
from ..capture.dynamo import capture, describe_break, trace
from ..capture.fx_facts import node_value
from ..config import DBCacheConfig, pass_settings
from ..errors import CaptureError
from ..passes import apply


@dataclass
class Carry:
    """A tensor crossing a segment boundary."""

    name: str
    role: str  # H | E | context
    shape: list[int]
    dtype: str


@dataclass
class BlockList:
    list: str  # the ModuleList's path
    blocks: list[int]  # first and last index in the chain
    pattern: int


@dataclass
class Cut:
    Fn: list[int]
    middle: list[int]
    Bn: list[int] | None


@dataclass
class InsertedNode:
    name: str
    op: str
    target: str


@dataclass
class StateTensor:
    shape: list[int]
    dtype: str
    bytes: int


@dataclass
class ChainReport:
    name: str
    pattern: str
    n_blocks: int
    lists: list[BlockList]
    cut: Cut
    fn_residual: dict[str, Carry]  # H_in, H_after_Fn
    carries_into_middle: list[Carry]
    carries_out_of_middle: list[Carry]
    inserted: list[InsertedNode]
    state: dict[str, StateTensor]

    @property
    def state_bytes(self) -> int:
        return sum(v.bytes for v in self.state.values())

    def block_labels(self) -> list[str]:
        return [f"{l.list}.{i - l.blocks[0]}" for l in self.lists for i in range(l.blocks[0], l.blocks[1] + 1)]


@dataclass
class GraphSize:
    nodes: int
    ops: dict[str, int] = field(default_factory=dict)


@dataclass
class GraphReport:
    matched: bool
    fn: int
    bn: int
    before: GraphSize
    after: GraphSize | None = None
    chains: list[ChainReport] = field(default_factory=list)
    reason: str | None = None  # why nothing matched
    graphs: int | None = None  # graphs the forward splits into, when it has a break
    graph_break: str | None = None
    islands: dict[str, int] | None = None  # class name -> instances made islands
    # nodes moved into the one cond branch that reads them (passes/sink.py), e.g. Fn's text-stream tail
    moved_into_branches: list[str] | None = None
    # tensor-subclass cond operands (quantized weights) passed as their plain tensors: class -> count
    flattened_subclasses: dict[str, int] | None = None

    def to_dict(self) -> dict:
        """The JSON form; fields that do not apply are left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and (k != "chains" or self.matched)}


def _ops(gm: GraphModule) -> dict[str, int]:
    return dict(Counter(n.op for n in gm.graph.nodes))


def _carry(node: Node, role: str) -> Carry:
    v = node_value(node)
    return Carry(node.name, role, list(v.shape), str(v.dtype).replace("torch.", ""))


def _one_graph(transformer, inputs: dict) -> tuple[GraphModule | None, str | None]:
    """(graph, None) from a full-graph capture, or (None, the reason it breaks)."""
    try:
        return capture(transformer, kwargs=inputs)[0], None
    except CaptureError as e:
        return None, f"{type(transformer).__name__}.forward cannot be captured as one graph " \
                     f"({describe_break(e.__cause__ or e)})"


def capture_graphs(transformer, inputs: dict) -> tuple[list[GraphModule], str | None]:
    """The graph(s) the backend would see (with the islands enable_cache makes, left installed: the
    caller uninstalls them): one with a full-graph capture, or, where the forward has a graph break
    (data-dependent Python, an unsupported context manager), every graph of the split forward and the
    reason of the break."""
    gm, reason = _one_graph(transformer, inputs)
    if (gm is None or islands.needed_for_graph(transformer, gm)) and islands.find(transformer, transformer.forward,
                                                                                 (), inputs):
        gm, reason = _one_graph(transformer, inputs)
    if gm is not None:
        return [gm], None
    return [g for g, _ in trace(transformer, kwargs=inputs, fullgraph=False).graphs], reason


def describe(transformer: torch.nn.Module, inputs: dict, fn: int = 1, bn: int = 0,
             separate_cfg: bool = False) -> GraphReport:
    """The report for ``transformer`` called with ``inputs`` and cut at Fn=``fn``, Bn=``bn``."""
    cfg = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn)  # validates fn / bn first
    settings = pass_settings(cfg, separate_cfg=separate_cfg)
    try:
        graphs, graph_break = capture_graphs(transformer, inputs)
        made = Counter(type(m).__name__ for m in transformer.modules() if hasattr(m, "_cachedit_island"))
        with torch.no_grad():
            report = _describe(graphs, graph_break, settings)
    finally:
        for m in transformer.modules():
            islands.uninstall(m)
    report.islands = dict(made) or None
    return report


def _describe(graphs: list[GraphModule], graph_break: str | None, settings: PassSettings) -> GraphReport:
    cfg = settings.cache_config
    result, gm, reasons = None, None, Counter()
    for g in graphs:
        r = apply(g, settings)
        if r.modified:
            result, gm = r, g
            break
        reasons[r.unmatched] += 1
    if gm is None and graphs:
        gm = max(graphs, key=lambda g: len(g.graph.nodes))
    before = GraphSize(len(gm.graph.nodes), _ops(gm)) if gm is not None else GraphSize(0)
    head = dict(fn=cfg.Fn_compute_blocks, bn=cfg.Bn_compute_blocks, before=before, graph_break=graph_break,
                graphs=len(graphs) if graph_break is not None else None)
    if result is None:
        why = "; ".join(r if k == 1 else f"{r} ({k} graphs)" for r, k in reasons.items()) or "no graph captured"
        if graph_break is not None:
            why = (f"{graph_break}; none of the {len(graphs)} graphs Dynamo splits it into has a cacheable chain: "
                   f"{why}")
        return GraphReport(matched=False, reason=why, **head)
    work = result.graph_module
    return GraphReport(matched=True, after=GraphSize(len(work.graph.nodes), _ops(work)),
                       chains=[_chain_report(rc) for rc in result.chains],
                       moved_into_branches=result.moved_into_branches,
                       flattened_subclasses=dict(Counter(result.flattened_subclasses)) or None, **head)


def _chain_report(rc) -> ChainReport:
    s, info = rc.split, rc.info
    start, lists = 0, []
    for path, count, pattern in info.list_patterns:
        lists.append(BlockList(path, [start, start + count - 1], int(pattern)))
        start += count
    n = info.n_blocks
    return ChainReport(
        name=info.name, pattern=info.pattern, n_blocks=n, lists=lists,
        cut=Cut([0, s.fn - 1], [s.fn, n - s.bn - 1], [n - s.bn, n - 1] if s.bn else None),
        fn_residual={"H_in": _carry(s.h_in, "H"), "H_after_Fn": _carry(s.h_fn, "H")},
        carries_into_middle=[_carry(i, info.streams[s.fn - 1].outputs.get(i, "context"))
                             for i in s.middle_inputs
                             if isinstance(node_value(i), torch.Tensor) and "_parameters_" not in i.name
                             and i.op != "placeholder"],
        carries_out_of_middle=[_carry(o, s.output_roles[o]) for o in s.middle_outputs],
        inserted=[InsertedNode(n.name, n.op, _target_name(n.target)) for n in rc.inserted
                  if n.target.__class__.__name__ != "builtin_function_or_method" or n.target.__name__ != "getitem"],
        state={f.name: StateTensor(list(f.shape), str(f.dtype).replace("torch.", ""),
                                   int(torch.Size(f.shape).numel() * torch.empty((), dtype=f.dtype).element_size()))
               for f in rc.layout.fields()},
    )


def _target_name(target) -> str:
    """An inserted node's target as a report names it: a step function by its name without the cache tag."""
    return getattr(target, "step_name", None) or getattr(target, "__name__", str(target))
