"""Blocks compiled as regions (``invoke_subgraph`` calls, see :mod:`cachedit_fx.capture.regions`) as the
passes see them: a call node whose body is a submodule of the graph, operand ``i`` feeding body
placeholder ``i`` and ``getitem(call, j)`` reading body output ``j``. The analyses open the body where
they follow dataflow inside a block; :func:`inline_calls` turns calls back into plain nodes where the
rewrite needs a block's own nodes (the Fn blocks, whose text-stream tail sink.py moves into the cond)."""
from __future__ import annotations

import operator
import re

import torch
from torch.fx import GraphModule, Node

from ..capture.fx_facts import ATTENTION_OPS, module_path, normalize_qualname

INVOKE = torch.ops.higher_order.invoke_subgraph


def is_call(node: Node) -> bool:
    """Is ``node`` a region call (``invoke_subgraph``)?"""
    return node.op == "call_function" and node.target is INVOKE


def body(call: Node) -> GraphModule:
    """The body a region call runs (a submodule of the graph that holds the call)."""
    return getattr(call.graph.owning_module, call.args[0].target)


def operands(call: Node) -> list:
    return list(call.args[2:])


def placeholders(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def body_outputs(call: Node) -> list[Node]:
    out = next(n for n in body(call).graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def output_index(node: Node) -> int | None:
    """``j`` where ``node`` is ``getitem(call, j)`` of a region call, else None."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node) \
            and is_call(node.args[0]) and isinstance(node.args[1], int):
        return node.args[1]
    return None


def has_attention(node: Node) -> bool:
    """Does ``node`` run an attention op, itself or inside the body of a region call?"""
    if any(a in str(node.target) for a in ATTENTION_OPS):
        return True
    return is_call(node) and any(has_attention(n) for n in body(node).graph.nodes)


def derived_in_body(call: Node, roots: set[Node]) -> set[Node]:
    """The nodes of ``call``'s body derived from the operands in ``roots``."""
    derived = {p for p, o in zip(placeholders(body(call)), operands(call)) if o in roots}
    for n in body(call).graph.nodes:
        if any(a in derived for a in n.all_input_nodes):
            derived.add(n)
    return derived


_BLOCK = re.compile(r"^(.*?)\.(\d+)(\.|$)")


def _block_of(path: str) -> tuple[str, int] | None:
    """(list path, index) of the first indexed module on ``path`` (``transformer_blocks.3.attn`` ->
    ("transformer_blocks", 3))."""
    m = _BLOCK.match(path)
    return (m.group(1), int(m.group(2))) if m else None


def _source_path(node: Node) -> str | None:
    source = getattr(node, "_dynamo_source", None)
    if source is None:
        return None
    return normalize_qualname(source.name() if callable(source.name) else source.name)


def foreign_weights(gm: GraphModule) -> list[str]:
    """Region calls that take a weight of another block of their lists: a graph Dynamo got wrong when it
    reused a region for a block whose weights it reads under the first block's names (torch 2.13 does,
    for some module classes). Such a graph computes every block with the first one's weights; it must
    not run. Returns one line per wrong call (empty: the graph is right)."""
    wrong = []
    calls = [n for n in gm.graph.nodes if is_call(n)]
    blocks = {n: next((b for path, _ in module_path(n) if (b := _block_of(path))), None) for n in calls}
    lists = {b[0] for b in blocks.values() if b}
    for call in calls:
        own = blocks[call]
        for op in operands(call):
            read = _block_of(_source_path(op) or "") if isinstance(op, Node) and op.op == "placeholder" else None
            if own and read and read[0] in lists and read != own:
                wrong.append(f"{own[0]}.{own[1]} is called with {op.name} of {read[0]}.{read[1]}")
                break
    return wrong


def _attr_copier(gm: GraphModule, sub: GraphModule):
    """Copies a get_attr node of ``sub`` into ``gm``: the attribute it reads (a higher-order op's
    subgraph inside the body) is set on ``gm`` under a fresh name."""
    def copy_attr(graph: torch.fx.Graph, node: Node) -> Node:
        value = getattr(sub, node.target)
        name, k = node.target, 0
        while hasattr(gm, name) and getattr(gm, name) is not value:
            k += 1
            name = f"{node.target}_inlined_{k}"
        setattr(gm, name, value)
        new = graph.get_attr(name)
        new.meta = dict(node.meta)
        return new
    return copy_attr


def inline_call(gm: GraphModule, call: Node) -> list[Node]:
    """Replace the region call ``call`` of ``gm`` by a copy of its body's nodes (each under the call's
    module stack); the getitems of its outputs become those nodes. Returns the nodes added."""
    sub = body(call)
    graph = gm.graph
    env = dict(zip(placeholders(sub), operands(call)))
    copy_attr = _attr_copier(gm, sub)
    added: list[Node] = []
    with graph.inserting_before(call):
        for n in sub.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            new = copy_attr(graph, n) if n.op == "get_attr" else graph.node_copy(n, lambda a: env[a])
            new.meta = {**n.meta, "nn_module_stack": dict(call.meta.get("nn_module_stack") or {})}
            env[n] = new
            added.append(new)
    outs = [env.get(o, o) for o in body_outputs(call)]
    for user in list(call.users):
        j = output_index(user)
        outs[j].meta["example_value"] = user.meta.get("example_value", outs[j].meta.get("example_value"))
        user.replace_all_uses_with(outs[j])
        graph.erase_node(user)
    getattr_node = call.args[0]
    graph.erase_node(call)
    if not getattr_node.users:
        graph.erase_node(getattr_node)
    return added


def inline_calls(gm: GraphModule, calls: list[Node]) -> int:
    """Inline each region call of ``calls`` (see :func:`inline_call`); returns how many were inlined."""
    for call in calls:
        inline_call(gm, call)
    if calls:
        gm.graph.lint()
        gm.recompile()
    return len(calls)
