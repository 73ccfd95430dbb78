"""Capture a transformer's forward as the FX graph the ``cachedit`` backend sees (Dynamo)."""
from __future__ import annotations

import re

import torch

_DICT_MODULES = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]")
_KEY = re.compile(r"\['([^']+)'\]")
_INDEX = re.compile(r"\[(\d+)\]")


def normalize_qualname(name: str) -> str:
    """``L['self'].__dict__['_modules']['transformer_blocks'].0`` -> ``transformer_blocks.0``."""
    name = _DICT_MODULES.sub(r".\1", name)
    name = re.sub(r"^(L\['[^']+'\]|self|L__self__)", "", name)
    name = _KEY.sub(r".\1", name)
    name = _INDEX.sub(r".\1", name)
    name = name.replace("._modules.", ".")
    return name.strip(".")


def module_path(node: torch.fx.Node) -> list[tuple[str, type | None]]:
    """The node's module stack, outermost first, as (normalised path, class)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = (value[0], value[1]) if isinstance(value, tuple) else (value, None)
        out.append((normalize_qualname(path), cls if isinstance(cls, type) else None))
    return out


def capture(module: torch.nn.Module, args=(), kwargs=None) -> tuple[torch.fx.GraphModule, list]:
    """Run Dynamo over ``module(*args, **kwargs)`` and return the (single) graph and example inputs."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=record, fullgraph=True, dynamic=False)(*args, **(kwargs or {}))
    torch._dynamo.reset()
    return graphs[0]


def clone_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a Dynamo graph that passes may edit, keeping what AOTAutograd reads from Dynamo
    graphs (``meta``, parameter sources, each placeholder's ``_dynamo_source``)."""
    graph = torch.fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    new = torch.fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, node in val_map.items():
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    return new
