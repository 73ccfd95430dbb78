"""Python float arguments in a Dynamo compile: which ones the graph being compiled specialised on, and
asking Dynamo to trace one as a graph input instead.

Dynamo specialises a float argument on its value (a guard ``L['t'] == 0.75``, a graph per value) unless
its frame state marks it dynamic, which automatic dynamic (``dynamic=None``, torch.compile's default)
does at its second value: from then on the float is a 0-dim float64 graph input that the graph
``item()``s. A float *timestep* specialised so gets a graph per value, each with its own cache state,
so nothing would cache. :func:`unspecialise` marks it dynamic from the first compile on and restarts
the trace, so one graph serves every value. This reads Dynamo's frame state (torch 2.13's
``torch._dynamo.pgo``): when those internals are not there, nothing is found and nothing changes.
"""
from __future__ import annotations

import torch

_TIMESTEP_NAMES = ("t", "sigma", "sigmas", "noise_level")
_tried: set = set()  # (code, argument, compile id) made dynamic: a restart that specialises again is final


def timestep_named(name: str) -> bool:
    """An argument name that says timestep: ``timestep``, ``t``, ``sigma(s)``, ``noise_level`` ..."""
    return "timestep" in name.lower() or name in _TIMESTEP_NAMES


def _tracer():
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - outside a Dynamo trace (or other internals): nothing to read
        return None


def specialised_floats() -> dict[str, bool]:
    """The Python float arguments of the frame being compiled that its graph is specialised on, by name:
    True where Dynamo specialised it (a constant-match guard: :func:`unspecialise` may help), False where
    it traced the frame again with the float's value because AOTAutograd could not turn its uses into
    tensor ops (final). Empty outside a Dynamo compile."""
    tx, context = _tracer(), torch._guards.TracingContext.try_get()
    if tx is None or context is None:
        return {}
    guarded = {g.name for g in context.guards_context.dynamo_guards if g.create_fn_name() == "CONSTANT_MATCH"}
    found = {name: True for name, value in tx.f_locals.items()
             if isinstance(value, float) and f"L[{name!r}]" in guarded}
    try:
        from torch._dynamo.symbolic_convert import TensorifyState

        forced = set(TensorifyState.force_specializations)
        sources = context.fake_mode.shape_env.var_to_sources
    except Exception:  # noqa: BLE001 - other Dynamo internals: what the guards say is all
        return found
    for sym, where in sources.items():
        if str(sym) in forced:
            found.update({getattr(getattr(src, "base", src), "local_name", None): False for src in where})
    found.pop(None, None)
    return found


def float_inputs(gm) -> dict:
    """The graph's float arguments that Dynamo made graph inputs (a 0-dim float64 tensor it ``item()``s),
    by argument name: the symbol of their value."""
    found = {}
    for node in gm.graph.nodes:
        memo = getattr(node.meta.get("example_value"), "item_memo", None) if node.op == "placeholder" else None
        name = getattr(getattr(node, "_dynamo_source", None), "local_name", None)
        if memo is not None and name is not None:
            found[name] = memo.node.expr
    return found


def made_constant(symbols: dict) -> set[str]:
    """Which of ``symbols`` (:func:`float_inputs`) the compile has since fixed to their value (an AOT
    compiler that could not turn a float's uses into tensor ops specialises on it: a graph per value)."""
    context = torch._guards.TracingContext.try_get()
    shape_env = getattr(getattr(context, "fake_mode", None), "shape_env", None)
    if shape_env is None:
        return set()
    return {name for name, sym in symbols.items() if getattr(shape_env.replacements.get(sym), "is_number", False)}


def unspecialise(name: str) -> bool:
    """Mark the float argument ``name`` of the frame being compiled dynamic and restart Dynamo's trace
    (raises ``TensorifyScalarRestartAnalysis``, which Dynamo answers by tracing the frame again, now
    with the float as a graph input). Returns False instead where this cannot work: automatic dynamic
    is off (``dynamic=False``: Dynamo overwrites the mark), this compile tried once already, or Dynamo's
    internals are not the expected ones."""
    tx = _tracer()
    if tx is None or not torch._dynamo.config.automatic_dynamic_shapes:
        return False
    try:
        from torch._dynamo import pgo
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis

        code = pgo.CodeId.make(tx.f_code, tx.closure)
        attempt = (code, name, str(torch._guards.CompileContext.current_compile_id()))
        entry = pgo.FrameStateSizeEntry.make_scalar(pgo.auto_dynamic)
        state = pgo.get_code_state()[code]
        speculation = tx.speculation_log
    except Exception:  # noqa: BLE001 - other Dynamo internals: leave the compile as it is
        return False
    if attempt in _tried:
        return False
    _tried.add(attempt)
    state.automatic_dynamic[f"L[{name!r}]"] = entry
    speculation.clear()  # the new trace takes another path through the float's uses
    raise TensorifyScalarRestartAnalysis()
