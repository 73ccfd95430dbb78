"""Region bodies (``invoke_subgraph``, see :mod:`cachedit_fx.capture.regions`) made ready for Inductor.

torch 2.13's Inductor fails to lower a region called inside a ``torch.cond`` branch ("both a fallback and
a decomp for same op", the class of torch issue #120160): functionalizing the cond re-traces its branches
with ``make_fx`` *without* a decomposition table, the region calls inside store that undecomposed aten
body in the trace's invoke_subgraph cache, and the real (decomposing) trace reuses it, for the calls
outside the cond too. Tracing each body to aten with Inductor's decompositions first leaves nothing for
that re-trace to get wrong. (Tagging the bodies with their decompositions works as well, but the table
is not picklable, which makes Inductor's and AOTAutograd's on-disk caches bypass the graph.)
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..errors import CaptureError
from ..passes.regions import INVOKE, foreign_weights


def check_calls(gm: GraphModule) -> None:
    """Refuse a graph whose region calls read other blocks' weights (see
    :func:`~cachedit_fx.passes.regions.foreign_weights`): it would compute wrong outputs, cached or not.

    Raises:
        CaptureError: naming the first wrong calls (``enable_cache`` then compiles the blocks inline).
    """
    wrong = foreign_weights(gm)
    if wrong:
        raise CaptureError(f"cachedit: Dynamo's graph of the blocks as compiled regions is wrong ({'; '.join(wrong[:2])}"
                           f"): every call of a region must read its own block's weights. Compile the blocks inline: "
                           "cachedit_fx.unmark_regions(model)")


def _decomposed(body: GraphModule, decompositions) -> GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    fakes = [n.meta.get("example_value", n.meta.get("val")) for n in body.graph.nodes if n.op == "placeholder"]
    mode = next(f.fake_mode for f in fakes if isinstance(f, torch._subclasses.FakeTensor))
    with mode:  # the body's own fake mode (its placeholders' example values belong to it)
        traced = make_fx(body, decomposition_table=decompositions)(*fakes)
    traced.meta.update(body.meta)
    return traced


def predecompose(gm: GraphModule) -> int:
    """Replace every region body that ``gm`` or the subgraphs it holds (cond branches) call by its aten
    version under Inductor's decompositions, traced once per body. Edits the modules that hold the calls
    (the passes' copies), never a body itself.

    Returns:
        The number of distinct bodies traced.
    """
    from torch._inductor.decomposition import select_decomp_table

    decompositions = select_decomp_table()
    done: dict[int, GraphModule] = {}

    def visit(owner: GraphModule) -> None:
        for node in owner.graph.nodes:
            if node.op == "call_function" and node.target is INVOKE:
                name = node.args[0].target
                body = getattr(owner, name)
                if id(body) not in done:
                    new = _decomposed(body, decompositions)
                    done[id(body)] = done[id(new)] = new
                setattr(owner, name, done[id(body)])
            elif node.op == "get_attr" and not any(u.target is INVOKE for u in node.users):
                sub = getattr(owner, node.target, None)
                if isinstance(sub, GraphModule):  # a cond branch: the calls inside it
                    visit(sub)

    visit(gm)
    return len({id(v) for v in done.values()})
