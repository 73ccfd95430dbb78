"""A rewritten graph as bytes another process rebuilds node for node (backend/background.py).

A GraphModule pickles as its Python code and re-traces it with ``symbolic_trace`` on load, which runs
into the functions the graph calls (the step functions, ``fresh_dense``) instead of keeping them as
calls. Here each node is written as what it is: its op, name, target (pickled: a function or operator by
its import path, a step function by value, see passes/steps.py) and arguments; each submodule the graph
calls or reads (cond branches, regions) is written the same way, and tensors it reads by ``get_attr``
by value. Node metadata is left out but for what AOTAutogradCache asks (``_meta``): the sending and the
receiving process compile the graph rebuilt from the same bytes, so both see the same graph and key
Inductor's caches alike.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule
from torch.fx.node import map_aggregate, map_arg


@dataclass(frozen=True)
class _Ref:
    """An argument that is another node of the same graph, by name."""

    name: str


@dataclass(frozen=True)
class _Op:
    """A ``torch.ops`` operator by name (a higher-order operator does not pickle; an overload need not)."""

    path: tuple[str, ...]  # ("higher_order", "cond") or ("aten", "add", "Tensor")

    def resolve(self):
        op = torch.ops
        for part in self.path:
            op = getattr(op, part)
        return op


def _target(target):
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _Op(("higher_order", target.name()))
    if isinstance(target, torch._ops.OpOverload):
        return _Op((*target._schema.name.split("::"), target._overloadname))
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _Op(tuple(target._qualified_op_name.split("::")))
    return target


@dataclass
class _Module:
    """One graph as written: its nodes, the graphs it calls or reads by path, the tensors it reads."""

    nodes: list[tuple]  # (op, name, target, args, kwargs, type, meta: the KEPT_META entries)
    children: dict[str, "_Module"]
    tensors: dict[str, torch.Tensor]


# Node metadata kept: a step function's call is marked wrapped (its code says so) and carries its cache
# hash (passes/rewrite._call), which AOTAutogradCache asks of a call target it cannot inspect.
KEPT_META = ("is_wrapped", "user_cache_hash")


def _meta(node) -> dict:
    """What ``node`` keeps of its metadata. AOTAutogradCache also takes a method call only on a node with
    an example value (a tensor): a receiver keeps a meta-device stand-in of it."""
    kept = {k: node.meta[k] for k in KEPT_META if k in node.meta}
    value = node.meta.get("example_value")
    static = isinstance(value, torch.Tensor) and all(isinstance(s, int) for s in (*value.shape, *value.stride()))
    if static and any(u.op == "call_method" and u.args[0] is node for u in node.users):
        kept["example_value"] = torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype,
                                                    device="meta")
    return kept


def _written(gm: GraphModule, memo: dict) -> _Module:
    """``gm`` as a _Module; a graph held in several places (a region body called from the root and from a
    cond branch) is written once, and pickle keeps it one object."""
    if id(gm) in memo:
        return memo[id(gm)]
    nodes = [(n.op, n.name, _target(n.target), map_arg(n.args, lambda a: _Ref(a.name)),
              map_arg(n.kwargs, lambda a: _Ref(a.name)), n.type, _meta(n)) for n in gm.graph.nodes]
    children, tensors = {}, {}
    memo[id(gm)] = written = _Module(nodes, children, tensors)
    for n in gm.graph.nodes:
        if n.op not in ("get_attr", "call_module"):
            continue
        value = gm.get_submodule(n.target) if n.op == "call_module" else _attr(gm, n.target)
        if isinstance(value, GraphModule):
            children[n.target] = _written(value, memo)
        elif isinstance(value, torch.Tensor):
            tensors[n.target] = value.detach()
        else:
            raise TypeError(f"graph {n.op} {n.target} reads a {type(value).__name__}, which is not sent")
    return written


def _attr(gm: torch.nn.Module, path: str):
    for part in path.split("."):
        gm = getattr(gm, part)
    return gm


def dumps(gm: GraphModule) -> bytes:
    """``gm`` and every graph it calls, as bytes :func:`loads` rebuilds.

    Raises:
        TypeError: the graph reads an attribute that is neither a graph nor a tensor.
        pickle.PicklingError / AttributeError: a call target with no import path (a lambda, a local function).
    """
    return pickle.dumps(_written(gm, {}))


def _rebuilt(written: _Module, memo: dict) -> GraphModule:
    if id(written) in memo:
        return memo[id(written)]
    graph, by_name = Graph(), {}
    def resolve(a):
        return by_name[a.name] if isinstance(a, _Ref) else a

    for op, name, target, args, kwargs, type_, meta in written.nodes:
        target = target.resolve() if isinstance(target, _Op) else target
        node = graph.create_node(op, target, map_aggregate(args, resolve), map_aggregate(kwargs, resolve),
                                 name=name, type_expr=type_)
        if node.name != name:
            raise ValueError(f"node {name} was renamed {node.name} when rebuilt")
        node.meta.update(meta)
        by_name[name] = node
    root = torch.nn.Module()
    for path, child in written.children.items():
        _set(root, path, _rebuilt(child, memo))
    for path, tensor in written.tensors.items():
        _set(root, path, tensor)
    memo[id(written)] = rebuilt = GraphModule(root, graph)
    return rebuilt


def _set(root: torch.nn.Module, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    if isinstance(value, torch.nn.Module):
        root.add_module(leaf, value)
    else:
        root.register_buffer(leaf, value)


def loads(data: bytes) -> GraphModule:
    """The graph :func:`dumps` wrote, rebuilt (without node metadata)."""
    return _rebuilt(pickle.loads(data), {})
