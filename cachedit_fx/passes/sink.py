"""Move the work only one branch of a ``torch.cond`` reads into that branch.

A value computed before the cond whose every use is an operand that one branch reads and the other
ignores runs on every call although only that branch needs it. In a DiT this is the part of the Fn
blocks that feeds the middle alone: with Bn = 0 the model drops the text stream after the last block,
so Fn's text-stream tail (Flux: the context output projection and feed-forward) only ever reaches the
skipped blocks. Moved into the full branch, a cached call no longer computes it; a computed call runs
the same ops, inside the branch.

Only ops without side effects move, and only ones whose inputs nothing in the graph writes in place
(moving a read later must not let it see a later write).
"""
from __future__ import annotations

import operator
import types

import torch
from torch.fx import GraphModule, Node

from ..capture.fx_facts import node_value, target_name

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _writes(node: Node) -> bool:
    """The node may write one of its arguments in place: a ``foo_`` method or op, ``x += y``, a mutable
    op schema, or a Python function from outside torch (ours update the state they are passed)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    target = node.target
    if target in _INPLACE_FUNCTIONS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if isinstance(target, types.FunctionType) and not (target.__module__ or "").startswith("torch"):
        return True
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("__")


# Ops whose result may share storage with an input: a write through one is seen through the others.
_VIEWS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "expand_as", "flatten",
          "unflatten", "chunk", "split", "tensor_split", "unbind", "narrow", "select", "t", "contiguous", "getitem",
          "__getitem__", "view_as", "movedim", "swapaxes", "as_strided", "detach", "alias", "unfold"}


def _is_view(node: Node) -> bool:
    name = target_name(node)
    if node.op not in ("call_function", "call_method") or name not in _VIEWS or not node.all_input_nodes:
        return False
    # an item of a tuple is a view only where the tuple holds views (a chunk's, not a function's results)
    return name not in ("getitem", "__getitem__") or isinstance(node_value(node.args[0]), torch.Tensor) \
        or _is_view(node.all_input_nodes[0])


def _view_source(node: Node) -> Node | None:
    """The value ``node`` is a view of, where it is a view op of that value alone."""
    return node.all_input_nodes[0] if _is_view(node) and len(node.all_input_nodes) == 1 else None


class _Storage:
    """Which nodes of a graph may share storage (through view ops), and which of them an in-place
    write in the graph may change."""

    def __init__(self, gm: GraphModule):
        self._parent: dict[Node, Node] = {}
        for n in gm.graph.nodes:
            if _is_view(n):
                self._parent[self.base(n)] = self.base(n.all_input_nodes[0])
        hit = {self.base(a) for n in gm.graph.nodes if _writes(n) for a in n.all_input_nodes}
        self.written = {n for n in gm.graph.nodes if self.base(n) in hit}

    def base(self, node: Node) -> Node:
        while self._parent.get(node, node) is not node:
            node = self._parent[node]
        return node


def _operand_value(node: Node) -> bool:
    """What a cond may take as an operand: a tensor, a symbolic or plain int."""
    value = node_value(node)
    return isinstance(value, (torch.Tensor, torch.SymInt, int)) and not isinstance(value, bool)


def _movable(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and not node.is_impure() and not _writes(node) and \
        node.target is not torch.ops.higher_order.cond


def _only_for(cond: Node, other_reads: list[bool], operands: list[Node], written: set[Node]) -> list[Node]:
    """The nodes before ``cond`` that only feed operands the other branch (``other_reads`` per
    operand) ignores, with no other use in the graph, in graph order."""
    for_branch = set(operands) - {n for n, r in zip(operands, other_reads) if r} - {cond.args[0]}
    candidates: set[Node] = set()
    stack = [n for n in for_branch if _movable(n)]
    while stack:  # the movable ancestors of those operands
        n = stack.pop()
        if n in candidates:
            continue
        candidates.add(n)
        stack.extend(a for a in n.all_input_nodes if _movable(a))
    changed = True
    while changed:  # the largest subset closed under "every use is in it or a branch operand of it"
        changed = False
        for n in list(candidates):
            uses_ok = all(u in candidates or (u is cond and n in for_branch) for u in n.users)
            inputs_ok = all(a in candidates or (_operand_value(a) and a not in written) for a in n.all_input_nodes)
            if not (uses_ok and inputs_ok):
                candidates.discard(n)
                changed = True
    return [n for n in cond.graph.nodes if n in candidates]


def _rebuilt(branch: GraphModule, old_operands: list[Node], new_operands: list[Node], prelude: list[Node]):
    """``branch`` taking ``new_operands`` and computing ``prelude`` (nodes of the outer graph) first."""
    graph = torch.fx.Graph()
    placeholders = {n: graph.placeholder(f"operand_{i}") for i, n in enumerate(new_operands)}
    env: dict[Node, Node] = {}
    for n in prelude:
        env[n] = graph.node_copy(n, lambda a: env[a] if a in env else placeholders[a])
    spare = next(iter(placeholders.values()))  # stands in for operands the branch never reads
    val_map = {}
    for p, o in zip([p for p in branch.graph.nodes if p.op == "placeholder"], old_operands):
        if p.users and o not in env and o not in placeholders:
            raise AssertionError(f"{p.name} is read by the branch but {o.name} moved into the other one")
        val_map[p] = env.get(o, placeholders.get(o, spare))
    graph.output(graph.graph_copy(branch.graph, val_map))
    return GraphModule(branch, graph)


def _plan(cond: Node, operands: list[Node], other_reads: list[bool], storage: _Storage):
    """(new operands, view nodes to copy into the branch, nodes to move into it) for the branch the
    other one's ``other_reads`` leaves, or None: nothing to move, or the operands would alias."""
    moved = _only_for(cond, other_reads, operands, storage.written)
    if not moved:
        return None
    inside = set(moved)
    copied: set[Node] = set()
    added = []
    for a in dict.fromkeys(x for n in moved for x in n.all_input_nodes if x not in inside):
        # Views (a chunk of the modulation vector) enter as their base, the views re-made inside: cond
        # operands must not share storage.
        chain = [a]
        while (src := _view_source(chain[-1])) is not None:
            chain.append(src)
        top = max(i for i, n in enumerate(chain) if _operand_value(n))
        copied.update(chain[:top])
        added.append(chain[top])
    new_operands = list(dict.fromkeys([o for o in operands if o not in inside] + added))
    bases = [storage.base(o) for o in new_operands if isinstance(node_value(o), torch.Tensor)]
    if len(bases) != len(set(bases)):
        return None
    prelude = [n for n in cond.graph.nodes if n in copied or n in inside]
    return new_operands, prelude, moved


def _conds(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond
            and n.args[1].op == "get_attr" and n.args[2].op == "get_attr"]


def sink_into_branches(gm: GraphModule) -> list[str]:
    """Move, for every ``torch.cond`` in ``gm`` whose branches are its submodules, the nodes only one
    branch needs into that branch. Edits ``gm`` in place.

    Returns:
        The names of the nodes moved (empty: the graph is unchanged).
    """
    storage = _Storage(gm)
    moved_names: list[str] = []
    for cond in _conds(gm):
        for side in (0, 1):  # the cached branch, then the full one
            pred, true_attr, false_attr, operands = cond.args
            branches = [getattr(gm, true_attr.target), getattr(gm, false_attr.target)]
            other = branches[1 - side]
            plan = _plan(cond, list(operands), [bool(p.users) for p in other.graph.nodes if p.op == "placeholder"],
                         storage)
            if plan is None:
                continue
            new_operands, prelude, moved = plan
            for k, attr in enumerate((true_attr, false_attr)):
                setattr(gm, attr.target, _rebuilt(branches[k], list(operands), new_operands,
                                                  prelude if k == side else []))
            cond.args = (pred, true_attr, false_attr, tuple(new_operands))
            for n in reversed(moved):
                gm.graph.erase_node(n)
            moved_names += [n.name for n in moved]
    if moved_names:
        gm.graph.lint()
        gm.recompile()
    return moved_names
