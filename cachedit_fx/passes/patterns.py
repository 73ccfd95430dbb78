"""Classify a chain from dataflow: which block inputs/outputs are the streams H and E, which output
continues which input, and the ForwardPattern (0–5) of each block list.

The streams of a chain are the first block's inputs that some block output *continues*: a path of
cheap, non-scaling ops (add, cat, slice, view ...) leads from the output back to the input — the
residual connection. (A gate multiplies the update, never the stream, so paths through ``mul`` do
not count: Chroma's per-block modulation would look like a stream otherwise.) Streams are followed
from block to block through the glue. H is the stream that derives from the transformer's latent
input (:func:`~.blocks.latent_input`) and flows on to the transformer's output; the other stream is
E. A block reads a text *context* when a 3-d input, not mixed with H, goes through a projection
into an attention op (cross-attention K/V): pattern 2; without one, pattern 3. Tuple order
(pattern 0 vs 1, 4 vs 5) is not visible in a flat graph; it is read from the block class's
``return`` statement.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from ..capture.fx_facts import node_shape
from ..capture.regions import model_class
from ..compat.forward_pattern import ForwardPattern
from ..errors import NoCacheableChain
from . import regions
from .blocks import ATTENTION_OPS, Block, Chain, derived_from, find_chains, latent_input, user_inputs

_CHEAP = {
    "add", "sub", "neg", "cat", "getitem", "view", "reshape", "contiguous", "clone",
    "to", "float", "half", "bfloat16", "type_as", "type", "permute", "transpose", "flatten", "unflatten",
    "squeeze", "unsqueeze", "chunk", "split", "narrow", "clip", "clamp", "iadd", "add_",
    "repeat", "expand", "masked_fill", "where", "_assert_tensor_metadata",
}


@dataclass(eq=False)
class BlockStreams:
    block: Block
    inputs: dict[Node, str]  # stream input -> "H" | "E"
    outputs: dict[Node, str]  # stream output -> "H" | "E"
    continues: dict[Node, Node | None]  # output -> the stream input it continues (None: created)
    takes_context: bool = False


@dataclass(eq=False)
class ChainInfo:
    """A classified chain: what the rewrite and the diff CLI consume."""

    chain: Chain
    streams: list[BlockStreams]
    list_patterns: list[tuple[str, int, ForwardPattern]] = field(default_factory=list)

    @property
    def blocks(self) -> list[Block]:
        return self.chain.blocks

    @property
    def n_blocks(self) -> int:
        return len(self.chain.blocks)

    @property
    def pattern(self) -> str:
        return "→".join(str(int(p)) for _, _, p in self.list_patterns)

    @property
    def name(self) -> str:
        return "+".join(f"{path}[{n}]" for path, n, _ in self.list_patterns)


@dataclass
class Unmatched:
    reason: str


def _op_name(node: Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", str(t))
    return name.split(".")[-1]


def _slice_region(node: Node, region):
    """``x[..., a:b, ...]`` as (dim, start, stop) in ``x``'s coordinates, composed with ``region``."""
    index = node.args[1] if len(node.args) > 1 else None
    if not isinstance(index, tuple):
        return None
    cut = [(d, ix) for d, ix in enumerate(index) if isinstance(ix, slice) and ix != slice(None)]
    if len(cut) != 1 or not all(isinstance(ix, slice) or ix is None for ix in index) or None in index:
        return None
    dim, ix = cut[0]
    if ix.step not in (None, 1):
        return None
    if not all(b is None or isinstance(b, int) for b in (ix.start, ix.stop)):
        return None  # a bound from a symbolic size (a dynamic-shape capture): the region is not known
    src = node_shape(node.args[0])
    size = src[dim] if src else None
    if isinstance(size, int):
        start, stop, _ = ix.indices(size)
    elif ix.stop is None or ix.stop < 0 or (ix.start or 0) < 0:
        return None  # counted from a size that is not a number
    else:
        start, stop = ix.start or 0, ix.stop
    if region is not None:
        if region[0] != dim:
            return None
        start, stop = start + region[1], start + region[2]
    return (dim, start, stop)


def _cat_inputs(node: Node, region):
    """The inputs of ``torch.cat`` that hold ``region`` (all of them when it cannot tell)."""
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    out = node_shape(node)
    if region is None or out is None or dim % len(out) != region[0]:
        return [(t, None) for t in tensors]
    offset = 0
    for t in tensors:
        size = node_shape(t)[region[0]] if node_shape(t) else None
        if size is None:
            return [(t, None) for t in tensors]
        if offset <= region[1] and region[2] <= offset + size:
            return [(t, (region[0], region[1] - offset, region[2] - offset))]
        offset += size
    return [(t, None) for t in tensors]


def _continues(block: Block, out: Node, streams: dict[Node, frozenset]) -> Node | None:
    """The stream input ``out`` continues (None: ``out`` is created inside the block).

    Walks back along cheap ops, following slices into the part of a ``cat`` they select, so that a
    block which joins [E, H], transforms the joint sequence and splits it again maps each half back
    to its own stream even when both halves have the same shape. A region call's output is followed
    into its body, and a body placeholder back out to the call's operand (``calls``: the region calls
    the walk is inside, innermost last).
    """
    inside = set(block.nodes)
    found, seen, todo = [], set(), [(out, None, ())]
    while todo:
        n, region, calls = todo.pop()
        if (n, region, calls) in seen:
            continue
        seen.add((n, region, calls))
        if not calls and n in streams:
            found.append(n)
            continue
        if calls and n.op == "placeholder":  # a body input: the operand the call passed
            call = calls[-1]
            todo.append((regions.operands(call)[regions.placeholders(regions.body(call)).index(n)], region,
                         calls[:-1]))
            continue
        if not calls and n not in inside or _op_name(n) not in _CHEAP:
            continue
        j = regions.output_index(n)
        if j is not None:
            todo.append((regions.body_outputs(n.args[0])[j], region, (*calls, n.args[0])))
            continue
        name = _op_name(n)
        if name == "getitem" and n.args and isinstance(n.args[0], Node) and node_shape(n.args[0]) is not None:
            todo.append((n.args[0], _slice_region(n, region), calls))
        elif name == "cat":
            todo.extend((a, r, calls) for a, r in _cat_inputs(n, region))
        else:
            same = region is not None and all(node_shape(a) == node_shape(n) for a in n.all_input_nodes)
            todo.extend((a, region if same else None, calls) for a in n.all_input_nodes)
    found = list(dict.fromkeys(found))
    if len(found) > 1:
        found = [f for f in found if node_shape(f) == node_shape(out)] or found
    if len({streams[f] for f in found}) > 1:
        raise NoCacheableChain(f"{block.name}: output {out.name} continues several streams "
                         f"({', '.join(f.name for f in found)}); cannot tell them apart")
    return found[0] if found else None


def _reads_context(block: Block, inp: Node, h_side: set[Node], weights: set[Node]) -> bool:
    """Does ``inp`` reach an attention op through a projection (an op with a weight input) without
    mixing with H first? That is cross-attention to a read-only context (K/V from ``inp``); masks
    reach attention without a projection, modulation vectors mix with H before any attention."""
    return _projected_into_attention(inp, set(block.nodes), h_side, weights, False)


def _projected_into_attention(start: Node, inside: set[Node], h_side: set[Node], weights: set[Node],
                              projected: bool) -> bool:
    todo = [(u, start, projected) for u in start.users if u in inside]
    seen = set()
    while todo:
        n, came_from, projected = todo.pop()
        if (n, came_from, projected) in seen:
            continue
        seen.add((n, came_from, projected))
        if regions.is_call(n):  # into the body, from the placeholders the value enters as
            sub, ops = regions.body(n), regions.operands(n)
            ph = regions.placeholders(sub)
            body_h, body_weights = regions.derived_in_body(n, h_side), {p for p, o in zip(ph, ops) if o in weights}
            body_nodes = set(sub.graph.nodes)
            if any(_projected_into_attention(p, body_nodes, body_h, body_weights, projected)
                   for p, o in zip(ph, ops) if o is came_from):
                return True
            continue
        projected = projected or any(a in weights for a in n.all_input_nodes)
        if any(op in str(n.target) for op in ATTENTION_OPS):
            if projected:
                return True
            continue
        if n in h_side:
            continue
        todo.extend((u, n, projected) for u in n.users if u in inside)
    return False


def return_order(cls: type | None) -> list[str] | None:
    """Names the block's forward returns, as 'H'/'E', from its source (None when unreadable)."""
    try:
        src = textwrap.dedent(inspect.getsource(model_class(cls).forward))
        fn = ast.parse(src).body[0]
        first = [a.arg for a in fn.args.args][1]
    except Exception:
        return None
    for node in reversed(list(ast.walk(fn))):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
            names = [e.id if isinstance(e, ast.Name) else None for e in node.value.elts]
            if len(names) == 2 and all(names):
                return ["H" if n == first else "E" for n in names]
    return None


def _pattern(bs: BlockStreams) -> ForwardPattern:
    ins, outs = sorted(set(bs.inputs.values())), list(bs.outputs.values())
    created = any(src is None for src in bs.continues.values())
    order = return_order(bs.block.cls)
    e_first = order == ["E", "H"]
    if ins == ["E", "H"]:
        return ForwardPattern.Pattern_1 if e_first else ForwardPattern.Pattern_0
    # A block that returns a new E the next block does not take: only the last block's E is live in
    # the graph, its return statement says all of them create one.
    if (created and len(outs) == 2) or (order is not None and len(order) == 2):
        return ForwardPattern.Pattern_5 if e_first else ForwardPattern.Pattern_4
    return ForwardPattern.Pattern_2 if bs.takes_context else ForwardPattern.Pattern_3


def _reaches_output(gm: GraphModule) -> set[Node]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    seen, todo = set(), [output]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def classify_chain(gm: GraphModule, chain: Chain) -> ChainInfo:
    latent = derived_from(gm, latent_input(gm))
    args = set(user_inputs(gm))
    weights = {n for n in gm.graph.nodes if n.op == "get_attr" or (n.op == "placeholder" and n not in args)}
    blocks = chain.blocks
    # 1. Follow the streams. A stream is named by the first block's input it starts from (or by the
    #    output that creates it); origin[v] = the streams value v carries (a cat carries both).
    later_inputs = set().union(*(set(b.inputs) for b in blocks[1:]))
    cand = [i for i in blocks[0].inputs if i not in later_inputs and i not in weights and node_shape(i) is not None]
    origin: dict[Node, frozenset] = {i: frozenset([i]) for i in cand}
    steps: list[tuple[dict[Node, frozenset], dict[Node, Node | None]]] = []
    for k, block in enumerate(blocks):
        if k:
            for n in chain.glue[k - 1]:
                src = frozenset().union(*(origin.get(a, frozenset()) for a in n.all_input_nodes))
                if src:
                    origin[n] = src
        ins = {i: origin[i] for i in block.inputs if i in origin}
        continues = {o: _continues(block, o, ins) for o in block.outputs}
        if k == 0:  # an input no output continues is conditioning (modulation, mask), not a stream
            ins = {i: s for i, s in ins.items() if i in set(continues.values())}
        for o, src in continues.items():
            origin[o] = ins[src] if src is not None else frozenset([o])
        steps.append((ins, continues))
    # 2. H: the latent-derived stream that flows on to the transformer's output.
    first = [next(iter(s)) for s in steps[0][0].values()]
    from_latent = [s for s in first if s in latent]
    if not from_latent:
        raise NoCacheableChain(f"{blocks[0].name}: no block input derives from the latent input")
    if len(from_latent) > 1:  # e.g. CogVideoX: text and video tokens are both slices of one embedding
        reaching = _reaches_output(gm)
        last = blocks[-1].outputs
        flows = [s for s in from_latent if any(s in origin[o] and o in reaching for o in last)]
        # Last resort when both flow on: the larger stream (image/video tokens outnumber text tokens).
        from_latent = flows if len(flows) == 1 else sorted(flows or from_latent, key=lambda s: -_numel(s))
    h = from_latent[0]
    # 3. Roles and context per block.
    results: list[BlockStreams] = []
    for block, (ins, continues) in zip(blocks, steps):
        roles = {i: ("H" if h in s else "E") for i, s in ins.items()}
        out_roles = {o: ("H" if h in origin[o] else "E") for o in continues}
        h_side = _derived_within(block, [i for i, r in roles.items() if r == "H"])
        context = any(i not in roles and i not in weights and node_shape(i) is not None and len(node_shape(i)) == 3
                      and _reads_context(block, i, h_side, weights) for i in block.inputs)
        results.append(BlockStreams(block, roles, out_roles, continues, context))
    if "H" not in results[-1].outputs.values():
        raise NoCacheableChain(f"{blocks[-1].name}: the last block returns no H stream")
    info = ChainInfo(chain, results)
    for bs in results:
        if not info.list_patterns or info.list_patterns[-1][0] != bs.block.list_path:
            info.list_patterns.append((bs.block.list_path, 0, _pattern(bs)))
        path, n, p = info.list_patterns[-1]
        info.list_patterns[-1] = (path, n + 1, p)
    return info


def _numel(n: Node) -> int:
    shape = node_shape(n) or ()
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _derived_within(block: Block, roots: list[Node]) -> set[Node]:
    derived = set(roots)
    for n in block.nodes:
        if any(a in derived for a in n.all_input_nodes):
            derived.add(n)
    return derived


def analyze(gm: GraphModule) -> list[ChainInfo] | Unmatched:
    """All classified chains of a graph, longest first, or why none could be used."""
    chains = find_chains(gm)
    if not chains:
        return Unmatched("no repeated transformer blocks found: caching needs >= 2 consecutive entries of a "
                         "ModuleList of attention blocks that feed each other")
    infos, reasons = [], []
    for c in chains:
        try:
            infos.append(classify_chain(gm, c))
        except NoCacheableChain as e:
            reasons.append(str(e))
    if not infos:
        return Unmatched("; ".join(reasons))
    # Longest first; between equally long chains the one nearer the output first (refiner lists that
    # prepare a stream run before the backbone, e.g. Z-Image's noise_refiner before its layers).
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    return sorted(infos, key=lambda i: (-i.n_blocks, -order[i.blocks[0].nodes[0]]))
