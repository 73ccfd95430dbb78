"""Find repeated transformer blocks (ModuleList children ``<path>.<i>``) and group them into chains.

A block is the contiguous run of graph nodes whose outermost indexed module is ``<path>.<i>``.
Consecutive blocks join one chain when the later one's inputs come from the earlier one's outputs,
directly or through top-level glue (cat / slice / view ops outside any module); a module between
them (a norm, a projection) or a block that takes nothing from its predecessor ends the chain.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ..capture.fx_facts import ATTENTION_OPS, concrete_shape, module_path, node_value
from . import regions

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


@dataclass(eq=False)
class Block:
    list_path: str
    index: int
    cls: type | None
    nodes: list[Node]
    inputs: list[Node] = field(default_factory=list)
    outputs: list[Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.list_path}.{self.index}"

    @property
    def has_attention(self) -> bool:
        return any(regions.has_attention(n) for n in self.nodes)  # a region call: its body's ops


@dataclass(eq=False)
class Chain:
    blocks: list[Block]
    glue: list[list[Node]]  # glue[i]: top-level nodes between blocks[i] and blocks[i + 1]

    @property
    def lists(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for b in self.blocks:
            if out and out[-1][0] == b.list_path:
                out[-1] = (b.list_path, out[-1][1] + 1)
            else:
                out.append((b.list_path, 1))
        return out


def _block_key(node: Node):
    for path, cls in module_path(node):
        m = _INDEXED.match(path)
        if m:
            return m.group(1), int(m.group(2)), cls
    return None


def _node_keys(gm: GraphModule) -> dict[Node, tuple | None]:
    """Each compute node's block key. A node with no module stack (``_enter_autocast`` / ``_exit_autocast``
    of an ``autocast`` region inside a block, as in Z-Image) between two nodes of the same block is
    part of that block."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    keys = {n: _block_key(n) for n in nodes}
    last, pending = None, []
    for n in nodes:
        if not module_path(n):
            pending.append(n)
            continue
        if keys[n] is not None and last is not None and keys[last] is not None and keys[last][:2] == keys[n][:2]:
            for p in pending:
                keys[p] = keys[n]
        last, pending = n, []
    return keys


def find_blocks(gm: GraphModule) -> list[Block]:
    blocks: list[Block] = []
    for node, key in _node_keys(gm).items():
        if key is None:
            continue
        path, index, cls = key
        if blocks and (blocks[-1].list_path, blocks[-1].index) == (path, index):
            # Contiguous, or the same block resumed after foreign nodes (not a clean call site:
            # find_chains drops it).
            blocks[-1].nodes.append(node)
        else:
            blocks.append(Block(path, index, cls, [node]))
    for b in blocks:
        inside = set(b.nodes)
        b.inputs = list(dict.fromkeys(a for n in b.nodes for a in n.all_input_nodes if a not in inside))
        b.outputs = [n for n in b.nodes if any(u not in inside for u in n.users)]
    # A list with one entry is not a repetition; keep lists with >= 2 blocks.
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.list_path] = counts.get(b.list_path, 0) + 1
    return [b for b in blocks if counts[b.list_path] >= 2]


def _next_compute(n: Node) -> Node:
    """The node after ``n``, past get_attr nodes (a higher-order op's subgraphs sit between the block's
    nodes, e.g. flex_attention's score_mod / mask_mod)."""
    n = n.next
    while n.op == "get_attr":
        n = n.next
    return n


def _is_contiguous(b: Block) -> bool:
    return all(_next_compute(b.nodes[i]) is b.nodes[i + 1] for i in range(len(b.nodes) - 1))


def _between(a: Block, b: Block) -> list[Node]:
    out, n = [], a.nodes[-1].next
    while n is not b.nodes[0] and n.op != "output":
        if n.op != "placeholder":
            out.append(n)
        n = n.next
    return out


def _feeds(prev: Block, nxt: Block, glue: list[Node]) -> bool:
    """Does ``nxt`` take a value derived from ``prev``'s outputs through module-free glue only?"""
    derived = set(prev.outputs)
    for n in glue:
        if any(a in derived for a in n.all_input_nodes):
            if module_path(n):
                return False  # a module between the blocks (norm, projection) ends the chain
            derived.add(n)
    return any(i in derived for i in nxt.inputs)


def _merges_foreign_stream(chain: Chain, nxt: Block, latent: Node | None, foreign: set[Node],
                           weights: set[Node]) -> bool:
    """At a list boundary: does ``nxt`` take an activation that does not come through the chain — the
    latent stream entering afresh (HunyuanVideo's token refiner feeding the double blocks' E) or
    another block list's output merged in (Lumina2 / Z-Image's context refiner joining the noise
    refiner's stream)? Then ``nxt`` starts a new chain. Inputs that the previous block takes as
    well (timestep embedding, rotary tables, masks, text context) are shared conditioning."""
    prev = chain.blocks[-1]
    stop = {n for b in chain.blocks for n in b.nodes}
    shared = set(prev.inputs)
    todo = [i for i in nxt.inputs if i not in shared and i not in weights]
    seen: set[Node] = set()
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        if n is latent or n in foreign:
            return True
        todo.extend(n.all_input_nodes)
    return False


def find_chains(gm: GraphModule, blocks: list[Block] | None = None) -> list[Chain]:
    blocks = find_blocks(gm) if blocks is None else blocks
    latent = latent_input(gm)
    args = set(user_inputs(gm))
    weights = {n for n in gm.graph.nodes if n.op == "get_attr" or (n.op == "placeholder" and n not in args)}
    attention_lists = {b.list_path for b in blocks if b.has_attention}
    chains: list[Chain] = []
    for b in blocks:
        if not _is_contiguous(b):
            continue
        if chains:
            last = chains[-1].blocks[-1]
            glue = _between(last, b)
            joins = _feeds(last, b, glue)
            if joins and last.list_path != b.list_path:
                foreign = {n for o in blocks if o.list_path in attention_lists and o.list_path not in
                           {c.list_path for c in chains[-1].blocks} for n in o.nodes}
                joins = not _merges_foreign_stream(chains[-1], b, latent, foreign, weights)
            if joins:
                chains[-1].blocks.append(b)
                chains[-1].glue.append(glue)
                continue
        chains.append(Chain([b], []))
    return [c for c in chains if len(c.blocks) >= 2 and any(b.has_attention for b in c.blocks)]


def _root_local(source) -> str | None:
    while source is not None and not hasattr(source, "local_name"):
        source = getattr(source, "base", None)
    return getattr(source, "local_name", None)


def _call_args(graph: torch.fx.Graph) -> list[Node]:
    out = []
    for n in graph.nodes:
        if n.op != "placeholder" or "_parameters_" in n.name or "_buffers_" in n.name:
            continue
        if _root_local(getattr(n, "_dynamo_source", None)) == "self":
            continue  # module state that is neither a parameter nor a buffer (Z-Image's RoPE tables)
        out.append(n)
    return out


def user_inputs(gm: GraphModule) -> list[Node]:
    """Placeholders that are call arguments (not lifted parameters, buffers or other module state)."""
    return _call_args(gm.graph)


def _widened(inp: tuple, out: tuple) -> bool:
    """Same shape except one dimension the output holds a multiple of (learned-sigma models predict
    mean and variance channels)."""
    if len(inp) != len(out):
        return False
    diff = [(a, b) for a, b in zip(inp, out) if a != b]
    return len(diff) == 1 and diff[0][0] > 0 and diff[0][1] % diff[0][0] == 0


def latent_input(gm: GraphModule) -> Node | None:
    """The transformer's latent input (``hidden_states``): a denoiser predicts in latent space, so it
    is the call argument whose shape the graph's output has (exactly, else up to a widened channel
    dimension). Dynamo orders placeholders by first use, not by the signature, so position alone
    does not tell."""
    inputs = [i for i in user_inputs(gm) if isinstance(node_value(i), torch.Tensor)]
    if not inputs:
        return None
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = [s for s in (concrete_shape(node_value(o)) for o in output.all_input_nodes) if s is not None]
    for match in (lambda a, b: a == b, _widened):
        for i in inputs:
            shape = concrete_shape(node_value(i))
            if shape is not None and any(match(shape, o) for o in outs):
                return i
    named = [i for i in inputs if getattr(getattr(i, "_dynamo_source", None), "local_name", None) == "hidden_states"
             or getattr(getattr(i, "_dynamo_source", None), "index", None) == "hidden_states"]
    return (named or inputs)[0]


_SINUSOID = ("sin", "cos")


def _reaches_sinusoid(gm: GraphModule, root: Node) -> bool:
    return any(str(getattr(n.target, "__name__", n.target)).split(".")[-1] in _SINUSOID
               for n in derived_from(gm, root) if n.op in ("call_function", "call_method"))


def timestep_input(gm: GraphModule) -> Node | None:
    """The timestep: a call argument of at most one dimension (a value per sample) that a sinusoidal
    embedding is computed from, found by dataflow whatever its name (``timestep``, ``t``, ``sigma``,
    ``noise_level`` ...). Among several (a guidance scale is embedded the same way) the one named like a
    timestep, else the first; without one, an argument named like a timestep."""
    def named(n: Node) -> bool:
        return "timestep" in n.name.lower() or n.name.lower() in ("l_t_", "l_kwargs_t_")

    tensors = [i for i in user_inputs(gm) if isinstance(node_value(i), torch.Tensor)]
    found = [i for i in tensors if node_value(i).dim() <= 1 and _reaches_sinusoid(gm, i)]
    return next((i for i in found if named(i)), None) or (found[0] if found else None) or \
        next((i for i in tensors if named(i)), None)


def derived_from(gm: GraphModule, root: Node | None) -> set[Node]:
    """Every node whose value depends on ``root``."""
    if root is None:
        return set()
    derived = {root}
    for n in gm.graph.nodes:
        if any(a in derived for a in n.all_input_nodes):
            derived.add(n)
    return derived
