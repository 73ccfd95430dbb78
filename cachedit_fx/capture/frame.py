"""What the code Dynamo generates for a frame does around the graph it compiled, read from inside the
backend call (the frame's translator is current there): where each graph input comes from, and whether
the frame has effects Dynamo replays after the graph.

An input's source is an expression over the frame's locals ``L`` (its arguments at entry) and globals
``G``, e.g. ``L['self'].__dict__['_modules']['proj_out']._parameters['weight']`` or
``L['kwargs']['hidden_states'].size()[1]``: evaluating it on a later call's locals gives what Dynamo's
code would pass (install/direct.py).
"""
from __future__ import annotations

from torch._dynamo import symbolic_convert
from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew
from torch.fx import GraphModule

_NEW = (AttributeMutationNew, ValueMutationNew)  # objects created while the frame ran


def input_sources(gm: GraphModule) -> list[str] | None:
    """The source of each of ``gm``'s placeholders, in order.

    Args:
        gm: the graph Dynamo handed the backend.
    Returns:
        One expression per graph input, or None where one has no source or is a Python number Dynamo
        passes as a tensor (its code converts it; the expression would give the number).
    """
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None)
        if source is None or arg.pass_arg_as_tensor:
            return None
        names.append(source.name)
    return names


def frame_has_side_effects() -> bool:
    """Whether the frame being compiled writes to an object that existed before it ran (an attribute, a
    container entry, a global) or registers a tensor hook: what Dynamo's code replays after each call of
    the graph. Objects the frame creates count only through what the frame returns (the caller compares
    the return value with the graph's outputs). True where no frame is being compiled (nothing known)."""
    tx = getattr(symbolic_convert.tls, "current_tx", None)
    if tx is None:
        return True
    effects = tx.output.side_effects
    if effects.tensor_hooks or effects.save_for_backward:
        return True
    return any(not isinstance(v.mutation_type, _NEW) and effects.is_modified(v)
               for v in effects.id_to_variable.values())
