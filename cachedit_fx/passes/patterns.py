"""Classify a chain from dataflow: which block inputs/outputs are the streams H and E, which output
continues which input, and the ForwardPattern (0–5) of each block list.

H is the stream that derives from the transformer's latent input (its first user input); E is the
other stream. A block output *continues* a stream input when a path of cheap ops (add, mul, cat,
slice, view ...) leads back to it — the residual connection. Tuple order (pattern 0 vs 1, 4 vs 5) is
not visible in a flat graph; it is read from the block class's ``return`` statement.
"""
from __future__ import annotations

import ast
import enum
import inspect
import operator
import textwrap
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from .blocks import Block, Chain, find_chains, user_inputs

_CHEAP = {
    "add", "sub", "mul", "truediv", "div", "neg", "cat", "getitem", "view", "reshape", "contiguous", "clone",
    "to", "float", "half", "bfloat16", "type_as", "type", "permute", "transpose", "flatten", "unflatten",
    "squeeze", "unsqueeze", "chunk", "split", "narrow", "clip", "clamp", "iadd", "imul", "add_", "mul_",
    "repeat", "expand", "masked_fill", "where", "_assert_tensor_metadata",
}


class ForwardPattern(enum.IntEnum):
    """How a block is called (cache-dit's numbering)."""

    HE_TO_HE = 0
    HE_TO_EH = 1
    H_CONTEXT_TO_H = 2
    H_TO_H = 3
    H_TO_H_NEW_E = 4
    H_TO_NEW_E_H = 5


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


def _shape(node: Node):
    v = node.meta.get("example_value", node.meta.get("val"))
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _continues(block: Block, out: Node, stream_inputs: list[Node]) -> Node | None:
    inside = set(block.nodes)
    found, seen, todo = [], set(), [out]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stream_inputs:
            found.append(n)
            continue
        if n in inside and _op_name(n) in _CHEAP:
            todo.extend(n.all_input_nodes)
    if len(found) > 1:
        found = [f for f in found if _shape(f) == _shape(out)] or found
    if len(found) > 1:
        raise ValueError(f"{block.name}: output {out.name} continues several streams "
                         f"({', '.join(f.name for f in found)}); cannot tell them apart")
    return found[0] if found else None


def _return_order(cls: type | None) -> list[str] | None:
    """Names the block's forward returns, as 'H'/'E', from its source (None when unreadable)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls.forward))
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


def _latent_derived(gm: GraphModule) -> set[Node]:
    inputs = user_inputs(gm)
    if not inputs:
        return set()
    derived = {inputs[0]}
    for n in gm.graph.nodes:
        if any(a in derived for a in n.all_input_nodes):
            derived.add(n)
    return derived


def _pattern(bs: BlockStreams) -> ForwardPattern:
    ins, outs = sorted(set(bs.inputs.values())), list(bs.outputs.values())
    created = any(src is None for src in bs.continues.values())
    order = _return_order(bs.block.cls)
    e_first = order == ["E", "H"]
    if ins == ["E", "H"]:
        return ForwardPattern.HE_TO_EH if e_first else ForwardPattern.HE_TO_HE
    if created and len(outs) == 2:
        return ForwardPattern.H_TO_NEW_E_H if e_first else ForwardPattern.H_TO_H_NEW_E
    return ForwardPattern.H_CONTEXT_TO_H if bs.takes_context else ForwardPattern.H_TO_H


def classify_chain(gm: GraphModule, chain: Chain) -> ChainInfo:
    latent = _latent_derived(gm)
    blocks = chain.blocks
    other_inputs = set().union(*(set(b.inputs) for b in blocks[1:]))
    results: list[BlockStreams] = []
    for k, block in enumerate(blocks):
        if k == 0:
            cand = [i for i in block.inputs if i not in other_inputs and _shape(i) is not None
                    and not (i.op == "placeholder" and ("_parameters_" in i.name or "_buffers_" in i.name))]
            roles = {i: ("H" if i in latent else "E") for i in cand}
            if "H" not in roles.values():
                raise ValueError(f"{block.name}: no block input derives from the latent input")
        else:
            prev = results[-1]
            origin: dict[Node, set[str]] = {o: {r} for o, r in prev.outputs.items()}
            for n in chain.glue[k - 1]:
                src = set().union(*(origin.get(a, set()) for a in n.all_input_nodes))
                if src:
                    origin[n] = src
            roles = {i: ("H" if "H" in origin[i] else "E") for i in block.inputs if i in origin}
        stream_inputs = list(roles)
        continues = {o: _continues(block, o, stream_inputs) for o in block.outputs}
        out_roles = {o: (roles[src] if src is not None else "E") for o, src in continues.items()}
        h_dim = next((_shape(i)[-1] for i, r in roles.items() if r == "H" and _shape(i)), None)
        context = any(i not in roles and i.op != "placeholder" and _shape(i) is not None and len(_shape(i)) == 3
                      and _shape(i)[-1] == h_dim and i not in latent for i in block.inputs)
        results.append(BlockStreams(block, roles, out_roles, continues, context))
    if "H" not in results[-1].outputs.values():
        raise ValueError(f"{blocks[-1].name}: the last block returns no H stream")
    info = ChainInfo(chain, results)
    for bs in results:
        if not info.list_patterns or info.list_patterns[-1][0] != bs.block.list_path:
            info.list_patterns.append((bs.block.list_path, 0, _pattern(bs)))
        path, n, p = info.list_patterns[-1]
        info.list_patterns[-1] = (path, n + 1, p)
    return info


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
        except ValueError as e:
            reasons.append(str(e))
    if not infos:
        return Unmatched("; ".join(reasons))
    return sorted(infos, key=lambda i: -i.n_blocks)
