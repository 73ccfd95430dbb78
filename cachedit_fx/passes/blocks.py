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

from ..capture import module_path

_INDEXED = re.compile(r"^(.*)\.(\d+)$")
_ATTENTION = ("scaled_dot_product_attention", "softmax", "baddbmm", "bmm")


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
        return any(any(a in str(n.target) for a in _ATTENTION) for n in self.nodes)


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


def find_blocks(gm: GraphModule) -> list[Block]:
    blocks: list[Block] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        key = _block_key(node)
        if key is None:
            continue
        path, index, cls = key
        if blocks and (blocks[-1].list_path, blocks[-1].index) == (path, index) and blocks[-1].nodes[-1].next is node:
            blocks[-1].nodes.append(node)
        elif blocks and (blocks[-1].list_path, blocks[-1].index) == (path, index):
            # The same block resumed after foreign nodes: not a clean call site.
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


def _is_contiguous(b: Block) -> bool:
    return all(b.nodes[i].next is b.nodes[i + 1] for i in range(len(b.nodes) - 1))


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


def find_chains(gm: GraphModule, blocks: list[Block] | None = None) -> list[Chain]:
    blocks = find_blocks(gm) if blocks is None else blocks
    chains: list[Chain] = []
    for b in blocks:
        if not _is_contiguous(b):
            continue
        if chains:
            last = chains[-1].blocks[-1]
            glue = _between(last, b)
            if _feeds(last, b, glue):
                chains[-1].blocks.append(b)
                chains[-1].glue.append(glue)
                continue
        chains.append(Chain([b], []))
    return [c for c in chains if len(c.blocks) >= 2 and any(b.has_attention for b in c.blocks)]


def user_inputs(gm: GraphModule) -> list[Node]:
    """Placeholders that are call arguments (not lifted parameters or buffers)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder" and "_parameters_" not in n.name and "_buffers_" not in n.name:
            out.append(n)
    return out
