"""Dynamic dimensions for export: the user's spec, the marks Dynamo captures with, the spec handed to
torch.export, and the shape templates a loaded package evaluates on each call to size its state.

The cache state is allocated per *concrete* shape (state cannot be allocated from symbolic
sizes), so a package with dynamic dims sizes its reference / ladders from the call's inputs and, when
they change, starts them afresh: the call after a shape change is always a computed step.
"""
from __future__ import annotations

import re

import sympy
import torch
from torch.export import Dim
from torch.utils._sympy.numbers import int_oo

from ..errors import ConfigError, ExportError, NoCacheableChain
from ..runtime.shapes import is_dynamic, plain_symbols, template


def _dims_of(name: str, spec, ndim: int) -> dict[int, object]:
    """One input's spec as {dim: Dim | Dim.AUTO | Dim.DYNAMIC}; accepts torch.export's dict or list form."""
    if isinstance(spec, dict):
        items = spec.items()
    elif isinstance(spec, (list, tuple)):
        items = enumerate(spec)
    else:
        raise ConfigError(f"dynamic_shapes[{name!r}]: expected a dict {{dim: Dim}} or a list with one entry per "
                         f"dimension, got {type(spec).__name__}")
    out = {}
    for d, dim in items:
        if dim is None:
            continue
        if not isinstance(d, int) or not -ndim <= d < ndim:
            raise ConfigError(f"dynamic_shapes[{name!r}]: dimension {d!r} is out of range for a {ndim}-d tensor")
        out[d % ndim] = dim
    return out


def mark_dynamic(call: dict, dynamic_shapes: dict | None) -> tuple[dict, dict]:
    """The canonical call (arguments by name) with the requested dims marked dynamic (on fresh aliases,
    so the caller's tensors are left unmarked), and the spec by argument name."""
    if not dynamic_shapes:
        return call, {}
    if not isinstance(dynamic_shapes, dict):
        raise ConfigError("dynamic_shapes: expected a dict keyed by the forward's argument names, e.g. "
                         "{'hidden_states': {1: torch.export.Dim('tokens')}}")
    tensors = {n: v for n, v in call.items() if isinstance(v, torch.Tensor)}
    spec = {}
    for name, value in dynamic_shapes.items():
        if name not in tensors:
            raise ConfigError(f"dynamic_shapes: {name!r} is not a tensor argument of this call; allowed: "
                             f"{sorted(tensors)}")
        spec[name] = _dims_of(name, value, tensors[name].dim())
    marked = {}
    for name, dims in spec.items():
        alias = tensors[name].detach()
        for d, dim in dims.items():
            if alias.shape[d] < 2:
                raise ConfigError(f"dynamic_shapes[{name!r}]: dimension {d} has size {alias.shape[d]} in the example; "
                                 "export specialises sizes 0 and 1, give an example with size >= 2 there")
            lo, hi = getattr(dim, "min", None), getattr(dim, "max", None)
            if hi is not None and hi < 2 ** 62:  # Dynamo wants both bounds or neither
                torch._dynamo.mark_dynamic(alias, d, min=max(lo or 0, 2), max=hi)
            elif lo is not None and lo > 2:
                torch._dynamo.mark_dynamic(alias, d, min=lo, max=2 ** 62)
            else:
                torch._dynamo.mark_dynamic(alias, d)
        marked[name] = alias
    return {k: marked.get(k, v) for k, v in call.items()}, spec


def constraint_error(module: torch.nn.Module, error: Exception) -> ExportError:
    """Dynamo's ConstraintViolationError (the model's code only works for some sizes of a dim marked
    dynamic) as one readable error naming dynamic_shapes and the first conditions the code imposes."""
    readable = re.sub(r"L\['kwargs'\]\['(\w+)'\]\.size\(\)\[(\d+)\]", r"\1.size(\2)", str(error))
    reasons = [line.strip(" -") for line in readable.splitlines() if "satisfy the generated guard" in line][:2]
    return ExportError(f"dynamic_shapes: {type(module).__name__} does not allow these dims to take every size in "
                      f"their range: {'; '.join(reasons) or readable.splitlines()[0]}. Narrow the range, or keep "
                      "the dim static (patchified 2-D latents, e.g. SD3's height/width, only take sizes the patch "
                      "embedding accepts; vary their batch, or export once per resolution)")


def parse_cli(items: list[str]) -> dict:
    """``--dynamic ARG:DIM[:NAME]`` items as a dynamic_shapes dict; items sharing NAME share one Dim."""
    dims: dict[str, Dim] = {}
    spec: dict[str, dict] = {}
    for item in items:
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].lstrip("-").isdigit():
            raise ConfigError(f"--dynamic {item!r}: expected ARG:DIM or ARG:DIM:NAME, e.g. hidden_states:1:tokens")
        name = parts[2] if len(parts) == 3 else f"{parts[0]}_{parts[1]}"
        spec.setdefault(parts[0], {})[int(parts[1])] = dims.setdefault(name, Dim(name))
    return spec


def state_templates(chain) -> dict[str, list]:
    """The symbolic shapes of one rewritten chain's shape-carrying state (reference, ladders); only
    entries with a dynamic size are listed."""
    try:
        out = {name: template(shape) for name, shape in chain.state_shapes().items()}
    except NoCacheableChain as e:
        raise ExportError(f"export: {e}") from e
    return {name: dims for name, dims in out.items() if is_dynamic(dims)}


def bounds_of(user_values: list) -> dict[str, list]:
    """symbol -> [min, max] (max None when unbounded) as the capture's shape environment knows them."""
    out = {}
    for _, _, size in plain_symbols(user_values):
        vr = size.node.shape_env.var_to_range[size.node.expr]
        bounded = vr.upper not in (int_oo, sympy.oo)  # int_oo: an open range
        out[str(size.node.expr)] = [int(vr.lower), int(vr.upper) if bounded else None]
    return out


def export_spec(user_specs: list, state_templates: list) -> tuple:
    """torch.export's dynamic_shapes for (*user inputs, *state): the user's Dims as given; each dynamic
    state size as Dim.AUTO, which export ties to the user dims it must equal."""
    state = [{d: Dim.AUTO for d, size in enumerate(t) if not isinstance(size, int)} if t else None
             for t in state_templates]
    return tuple(user_specs) + tuple(state)
