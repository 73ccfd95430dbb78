"""Host reads of a compiled graph: counted while it runs (``CountHostReads``) and found in its nodes
(``host_read_nodes``). A ``torch.cond`` counts one read, for its predicate."""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default"}

HOST_READ_TARGETS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                     torch.ops.aten.is_nonzero.default)


class CountHostReads(TorchDispatchMode):
    """Counts host reads; a ``cond`` counts one read for its predicate and its branch runs under the
    mode, so reads inside the branches are counted too."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.higher_order.cond:
            pred, true_fn, false_fn, operands = args
            self.ops["cond_predicate"] += 1
            branch = true_fn if bool(pred) else false_fn
            with self:
                return branch(*operands)
        self.ops["dispatched"] += 1
        name = str(func)
        if name in HOST_READS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return self.ops["cond_predicate"] + sum(self.ops[n] for n in HOST_READS)


def host_read_nodes(gm: torch.fx.GraphModule, where: str = "") -> list[str]:
    """The nodes of ``gm`` and its subgraphs (cond branches) that read a tensor on the host."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in HOST_READ_TARGETS:
            found.append(f"{where}{node.name}: {node.target}")
        if node.op == "call_method" and node.target in ("item", "tolist", "__bool__", "nonzero"):
            found.append(f"{where}{node.name}: .{node.target}()")
    for name, sub in gm.named_children():
        if isinstance(sub, torch.fx.GraphModule):
            found += host_read_nodes(sub, f"{where}{name}.")
    return found
