"""Small facts about Dynamo's FX graphs that the passes, islands and reports share: module paths of
nodes, example values and their concrete shapes, and a copy of a graph that passes may edit."""
from __future__ import annotations

import re

import torch
from torch.fx import GraphModule, Node

_DICT_MODULES = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]")
_KEY = re.compile(r"\['([^']+)'\]")
_INDEX = re.compile(r"\[(\d+)\]")


# Op names that mark an attention block; an island node lists the ones it hides in its name (islands.py).
ATTENTION_OPS = ("scaled_dot_product_attention", "flex_attention", "softmax", "baddbmm", "bmm")

def normalize_qualname(name: str) -> str:
    """``L['self'].__dict__['_modules']['transformer_blocks'].0`` -> ``transformer_blocks.0``."""
    name = _DICT_MODULES.sub(r".\1", name)
    name = name.replace(".forward.__self__", "")  # a module reached through an instance forward (a region's)
    name = re.sub(r"^(L\['[^']+'\]|self|L__self__)", "", name)
    name = _KEY.sub(r".\1", name)
    name = _INDEX.sub(r".\1", name)
    name = name.replace("._modules.", ".")
    return name.strip(".")


def module_path(node: Node) -> list[tuple[str, type | None]]:
    """The node's module stack, outermost first, as (normalised path, class)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = (value[0], value[1]) if isinstance(value, tuple) else (value, None)
        out.append((normalize_qualname(path), cls if isinstance(cls, type) else None))
    return out


def target_name(node: Node) -> str:
    """The op a node calls, by name: ``"view"`` for ``x.view(...)``, ``"chunk"`` for ``torch.chunk``,
    ``"getitem"`` for ``operator.getitem`` (an overload's packet name, without ``.default``)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.split(".")[0]


def node_value(node: Node):
    """The example value Dynamo (``example_value``) or a later trace (``val``) recorded for a node."""
    return node.meta.get("example_value", node.meta.get("val"))


def concrete_shape(value) -> tuple[int, ...] | None:
    """A tensor's shape with symbolic sizes (a capture with dynamic dims) read as their example values.
    Passes decide on these; comparing the symbolic sizes themselves would add guards that specialise
    the dims back to constants."""
    if not isinstance(value, torch.Tensor):
        return None
    if any(not isinstance(d, int) and d.node.hint is None for d in value.shape):
        return None  # a data-dependent size has no example value: an unknown shape, like a non-tensor's
    return tuple(d if isinstance(d, int) else int(d.node.hint) for d in value.shape)


def node_shape(node: Node) -> tuple[int, ...] | None:
    return concrete_shape(node_value(node))


def clone_graph_module(gm: GraphModule) -> GraphModule:
    """A copy of a Dynamo graph that passes may edit, keeping what AOTAutograd reads from Dynamo
    graphs (``meta``, parameter sources, each placeholder's ``_dynamo_source``)."""
    graph = torch.fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    new = GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, node in val_map.items():
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    return new
