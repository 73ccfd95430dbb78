"""Cut a classified chain into Fn | middle | Bn and find the carries between the segments."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..capture.fx_facts import concrete_shape, node_value, target_name
from ..errors import ConfigError, NoCacheableChain
from .patterns import BlockStreams, ChainInfo


@dataclass(eq=False)
class Split:
    info: ChainInfo
    fn: int
    bn: int
    fn_nodes: list[Node]
    middle_nodes: list[Node]
    bn_nodes: list[Node]
    h_in: Node  # H entering the chain
    h_fn: Node  # H leaving Fn
    middle_inputs: list[Node]  # values defined before the middle and used in it (Fn -> middle carries included)
    middle_outputs: list[Node]  # values defined in the middle and used after it (middle -> Bn carries)
    output_roles: dict[Node, str]  # middle output -> "H" | "E"


def _span(first: Node, last: Node) -> list[Node]:
    out, n = [], first
    while True:
        if n.op not in ("placeholder", "get_attr", "output"):
            out.append(n)
        if n is last:
            return out
        n = n.next


def _role_output(bs: BlockStreams, role: str) -> Node | None:
    return next((o for o, r in bs.outputs.items() if r == role), None)


# Ops that select or re-lay out part of a tensor without computing on it: how a context-parallel hook
# shards a block's input (``x.chunk(world, dim)[rank]``).
_SELECTIONS = {"chunk", "split", "tensor_split", "narrow", "getitem", "select", "slice", "contiguous", "view",
               "reshape"}


def _selection(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and target_name(node) in _SELECTIONS


def _as_block_reads(h_in: Node, h_fn: Node, fn_nodes: list[Node]) -> Node:
    """H as the first block reads it: ``h_in`` itself, or, where a hook inside the first block selects
    this rank's shard of it (context parallelism splits the sequence at ``blocks.0``), that shard, which
    has H's shape after Fn. The residual of Fn is taken against it."""
    want = concrete_shape(node_value(h_fn))
    if concrete_shape(node_value(h_in)) == want:
        return h_in
    inside, frontier = set(fn_nodes), [h_in]
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in inside and _selection(user) and user.all_input_nodes[:1] == [node]:
                if concrete_shape(node_value(user)) == want:
                    return user
                frontier.append(user)
    return h_in


def split_chain(gm: GraphModule, info: ChainInfo, fn: int, bn: int, min_fn: int = 1) -> Split:
    """``fn`` may be 0 where the config allows it (``min_fn``: MagCache skips the first block too); Fn is
    then empty and H leaves it as it entered."""
    n = info.n_blocks
    if fn < min_fn or bn < 0 or fn + bn > n:
        raise ConfigError(f"Fn_compute_blocks={fn}, Bn_compute_blocks={bn} do not fit chain {info.name} of {n} "
                         f"blocks: need {min_fn} <= Fn, 0 <= Bn and Fn + Bn <= {n}")
    blocks = info.blocks
    chain_nodes = _span(blocks[0].nodes[0], blocks[-1].nodes[-1])
    pos = {node: i for i, node in enumerate(chain_nodes)}
    cut1 = pos[blocks[fn - 1].nodes[-1]] + 1 if fn else 0
    cut2 = pos[blocks[n - bn - 1].nodes[-1]] + 1
    fn_nodes, middle, bn_nodes = chain_nodes[:cut1], chain_nodes[cut1:cut2], chain_nodes[cut2:]
    h_in = next(i for i, r in info.streams[0].inputs.items() if r == "H")
    h_fn = _role_output(info.streams[fn - 1], "H") if fn else h_in
    h_in = _as_block_reads(h_in, h_fn, fn_nodes)
    inside = set(middle)
    # A get_attr (a higher-order op's subgraph: flex_attention's score_mod / mask_mod) is code, not data:
    # the segments copy it rather than take it as an operand.
    inputs = list(dict.fromkeys(a for m in middle for a in m.all_input_nodes if a not in inside and a.op != "get_attr"))
    outputs = [m for m in middle if any(u not in inside for u in m.users)]
    h_mid = _role_output(info.streams[n - bn - 1], "H") if middle else None
    roles = {o: ("H" if o is h_mid else "E") for o in outputs}
    return Split(info, fn, bn, fn_nodes, middle, bn_nodes, h_in, h_fn, inputs, outputs, roles)


def _reader(graph: torch.fx.Graph, env: dict):
    """Maps a node to its copy in ``graph``; a get_attr the segment reads is copied in on first use."""
    def read(a: Node) -> Node:
        if a not in env and a.op == "get_attr":
            env[a] = graph.node_copy(a)
        return env[a]
    return read


def segment_module(gm: GraphModule, nodes: list[Node], inputs: list[Node], outputs: list[Node]) -> GraphModule:
    """The nodes as a standalone GraphModule taking ``inputs`` and returning ``outputs`` (a tuple)."""
    graph = torch.fx.Graph()
    env = {i: graph.placeholder(i.name) for i in inputs}
    for i in inputs:
        env[i].meta = dict(i.meta)
    read = _reader(graph, env)
    for node in nodes:
        env[node] = graph.node_copy(node, read)
    graph.output(tuple(env[o] for o in outputs))
    return GraphModule(gm, graph)


def passthrough_module(gm: GraphModule, split: Split) -> GraphModule:
    """The middle with every block replaced by identity on its streams (glue between blocks kept):
    what a cached step produces before the cached residuals are added."""
    owner: dict[Node, BlockStreams] = {}
    middle = set(split.middle_nodes)
    for bs in split.info.streams:
        for node in bs.block.nodes:
            if node in middle:
                owner[node] = bs
    graph = torch.fx.Graph()
    env = {i: graph.placeholder(i.name) for i in split.middle_inputs}
    read = _reader(graph, env)
    for node in split.middle_nodes:
        bs = owner.get(node)
        if bs is None:
            env[node] = graph.node_copy(node, read)
        elif node in bs.continues:
            src = bs.continues[node]
            if src is None:
                val = node_value(node)
                if not all(isinstance(d, int) for d in val.shape):
                    raise NoCacheableChain(f"{node.name}: a block output that starts a new stream has a dynamic shape; "
                                     "a cached step cannot build it (keep these dimensions static)")
                env[node] = graph.call_function(torch.zeros, (tuple(val.shape),), {"dtype": val.dtype,
                                                                                  "device": val.device})
            else:
                env[node] = env[src]
    for out in split.middle_outputs:
        if out not in env:
            raise NoCacheableChain(f"{out.name}: a value computed inside a middle block is used after the middle; "
                             "a cached step could not produce it")
    graph.output(tuple(env[o] for o in split.middle_outputs))
    graph.eliminate_dead_code()
    return GraphModule(gm, graph)
