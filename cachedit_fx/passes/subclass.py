"""Tensor-subclass weights across the cache decision: quantized weights (torchao's ``Int8Tensor``,
``Float8Tensor``, ``IntxUnpackedToInt8Tensor`` ...) are tensor subclasses, and the middle blocks' weights
are operands of the chain's ``torch.cond``. torch 2.13's cond has no rule for a subclass operand (eager,
Dynamo and AOTAutograd all raise ``There was no rule registered for HOP cond and subclass ...``).

This pass, the last of :func:`cachedit_fx.passes.apply` (so the backend, export and ``compile=False`` all
get it), passes each subclass operand as its plain inner tensors instead (``__tensor_flatten__``,
recursively) and rebuilds the subclass inside both branches (``__tensor_unflatten__`` with the metadata
of the captured value) before its first use. The outer graph only reads attributes of the weight (free
at run time; AOTAutograd flattens subclass inputs anyway), the branches compute exactly what the
original ops computed on the rebuilt weight, and nothing global is registered. The module's weights and
state dict are left as they are."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..capture.fx_facts import node_value
from ..errors import NoCacheableChain


def is_user_subclass(value) -> bool:
    """A tensor subclass of a library's or the user's (torchao's quantized tensors, DTensor), not one of
    the compiler's own (FakeTensor, FunctionalTensor)."""
    from torch._subclasses import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if not isinstance(value, torch.Tensor) or isinstance(value, (FakeTensor, FunctionalTensor)):
        return False
    return type(value) not in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer)


@dataclass(frozen=True)
class SubclassSpec:
    """How to rebuild a subclass from its leaves: the type, its flatten context, the inner attribute
    names with their own specs (None: a plain tensor), and the outer size and stride."""

    cls: type
    context: object
    attrs: tuple[str, ...]
    inner: tuple
    size: tuple
    stride: tuple


def flatten_value(value) -> tuple[list[torch.Tensor], SubclassSpec | None]:
    """The plain tensors inside ``value`` (depth first) and the spec that rebuilds it (None for a plain
    tensor)."""
    if not is_traceable_wrapper_subclass(value):
        return [value], None
    attrs, context = value.__tensor_flatten__()
    leaves, inner = [], []
    for attr in attrs:
        sub_leaves, sub_spec = flatten_value(getattr(value, attr))
        leaves += sub_leaves
        inner.append(sub_spec)
    return leaves, SubclassSpec(type(value), context, tuple(attrs), tuple(inner), tuple(value.size()),
                                tuple(value.stride()))


def rebuild(spec: SubclassSpec | None, leaves) -> torch.Tensor:
    """The inverse of :func:`flatten_value`; ``leaves`` an iterator over the plain tensors."""
    if spec is None:
        return next(leaves)
    inner = {attr: rebuild(sub, leaves) for attr, sub in zip(spec.attrs, spec.inner)}
    return spec.cls.__tensor_unflatten__(inner, spec.context, spec.size, spec.stride)


def subclass_leaves(value) -> tuple[torch.Tensor, ...]:
    """The graph node reading a subclass operand's plain tensors (attribute reads, no copy)."""
    return tuple(flatten_value(value)[0])


def _rebuilder(spec: SubclassSpec):
    def rebuild_subclass(*leaves):
        return rebuild(spec, iter(leaves))

    rebuild_subclass.__name__ = rebuild_subclass.__qualname__ = f"cachedit_rebuild_{spec.cls.__name__}"
    return rebuild_subclass


def _flattenable(value) -> tuple[list[torch.Tensor], SubclassSpec]:
    """``value``'s leaves and spec, checked by rebuilding the captured value from them.

    Raises:
        NoCacheableChain: the subclass cannot be flattened into plain tensors (no traceable
            ``__tensor_flatten__`` / ``__tensor_unflatten__``, or the rebuild does not give it back).
    """
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    why = ("a cached chain's weights are tensor subclasses of type {name}, which cannot cross the cache decision "
           "(torch.cond) and cannot be flattened into plain tensors: {reason}")
    if not is_traceable_wrapper_subclass(value):
        raise NoCacheableChain(why.format(name=name, reason="it has no __tensor_flatten__ / __tensor_unflatten__"))
    try:
        leaves, spec = flatten_value(value)
        back = rebuild(spec, iter(leaves))
    except Exception as e:  # noqa: BLE001 - any failure of the library's flatten means: not flattenable
        raise NoCacheableChain(why.format(name=name, reason=f"{type(e).__name__}: {e}")) from None
    if type(back) is not type(value) or back.shape != value.shape or back.dtype != value.dtype:
        raise NoCacheableChain(why.format(name=name, reason=f"rebuilding it gives {type(back).__name__} "
                                                            f"{tuple(back.shape)} {back.dtype}"))
    return leaves, spec


def _rewrite_branch(branch: GraphModule, index: int, leaves: list[torch.Tensor], spec: SubclassSpec,
                    value) -> None:
    """In a branch graph, the placeholder at ``index`` becomes one placeholder per leaf and a rebuild."""
    graph = branch.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    old = placeholders[index]
    with graph.inserting_before(old):
        new = [graph.placeholder(f"{old.name}_leaf{k}") for k in range(len(leaves))]
    for node, leaf in zip(new, leaves):
        node.meta["example_value"] = leaf
    with graph.inserting_after(placeholders[-1]):
        rebuilt = graph.call_function(_rebuilder(spec), tuple(new))
    rebuilt.meta["example_value"] = value
    old.replace_all_uses_with(rebuilt)
    graph.erase_node(old)


def _flatten_cond(gm: GraphModule, cond: Node) -> list[str]:
    pred, true_attr, false_attr, operands = cond.args
    new_operands, rewrites = [], []
    for i, operand in enumerate(operands):
        value = node_value(operand) if isinstance(operand, Node) else None
        if not is_user_subclass(value):
            new_operands.append(operand)
            continue
        leaves, spec = _flattenable(value)
        with gm.graph.inserting_before(cond):
            flat = gm.graph.call_function(subclass_leaves, (operand,))
            leaf_nodes = [gm.graph.call_function(operator.getitem, (flat, k)) for k in range(len(leaves))]
        for node, leaf in zip(leaf_nodes, leaves):
            node.meta["example_value"] = leaf
        new_operands += leaf_nodes
        rewrites.append((i, leaves, spec, value))
    for attr in (true_attr, false_attr) if rewrites else ():
        branch = getattr(gm, attr.target)
        for i, leaves, spec, value in reversed(rewrites):  # last first: earlier placeholders keep their index
            _rewrite_branch(branch, i, leaves, spec, value)
        branch.graph.lint()
        branch.recompile()
    cond.args = (pred, true_attr, false_attr, tuple(new_operands))
    return [type(value).__name__ for _, _, _, value in rewrites]


def flatten_subclass_operands(gm: GraphModule) -> list[str]:
    """Rewrite ``gm`` in place so that no ``torch.cond`` takes a tensor-subclass operand.

    Args:
        gm: a graph after the rewrite (its conds' branches are submodules of ``gm``).

    Returns:
        The class name of every operand flattened (empty: the graph had none).

    Raises:
        NoCacheableChain: an operand's subclass cannot be flattened; the message names the class.
    """
    flattened = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
            flattened += _flatten_cond(gm, node)
    if flattened:
        gm.graph.lint()
        gm.recompile()
    return flattened
