"""The process group a graph's sequence is sharded over (context parallelism), found from the
graph's own collectives: diffusers' Ulysses all-to-alls and ring all-gathers, and the gather of the
output, name their groups as arguments."""
from __future__ import annotations

from torch.fx import GraphModule


def _group_name(node) -> str | None:
    if node.op != "call_function" or not str(node.target).startswith("_c10d_functional."):
        return None
    target = node.target  # an OpOverloadPacket in a Dynamo graph, an OpOverload after AOT tracing
    schema = getattr(target, "_schema", None) or getattr(getattr(target, "default", None), "_schema", None)
    if schema is None:
        return None
    names = [a.name for a in schema.arguments]
    if "group_name" not in names:
        return None
    i = names.index("group_name")
    return node.args[i] if i < len(node.args) else node.kwargs.get("group_name")


def sequence_group(gm: GraphModule) -> str | None:
    """The largest process group any collective of ``gm`` runs over, by name: the one spanning every
    shard of the sequence (a Ulysses x ring mesh gathers the output over both); None without collectives."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    names = {name for n in gm.graph.nodes if isinstance(name := _group_name(n), str)}
    if not names:
        return None
    return max(sorted(names), key=lambda name: _resolve_process_group(name).size())
