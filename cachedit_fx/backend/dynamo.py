"""The ``cachedit`` Dynamo backend: rewrite the captured graph, then hand it to an inner compiler.

``torch.compile(transformer, backend="cachedit", options={...})`` resolves through the
``torch_dynamo_backends`` entry point; the options are :mod:`~cachedit_fx.backend.options`'. Anything the
passes cannot handle compiles uncached with one warning.
"""
from __future__ import annotations

import warnings

import torch
from torch.fx import GraphModule

from ..capture.scalars import float_inputs, made_constant, specialised_floats, timestep_named, unspecialise
from ..capture.fx_facts import node_value
from ..errors import NoCacheableChain
from ..passes import apply
from ..runtime.handle import CompiledGraph, graph_weights
from ..runtime.ranks import chains_group, check_same_config
from .background import BackgroundCompiled
from .inner import CACHED_GRAPH_INDUCTOR_OPTIONS, inner_compile
from .options import BackendOptions, parse_options
from .regions import check_calls, predecompose
from .states import SizedStates, StaticStates, is_static


def _compiled(gm, example_inputs, opts: BackendOptions, inductor_defaults: dict | None = None):
    compiled = inner_compile(gm, example_inputs, opts.inner, opts.inner_options, inductor_defaults,
                             opts.background_compile)
    if isinstance(compiled, BackgroundCompiled):
        opts.handle.background.append(compiled)
    return compiled


def _uncached(gm, example_inputs, opts: BackendOptions, reason: str, cause: str | None = None):
    """``gm`` compiled as it is, with one warning: per graph, or per install where ``cause`` names it."""
    compiled = _compiled(gm, example_inputs, opts)
    # Recorded once compiled (a compile Dynamo restarts leaves nothing behind), so handles_for(module) /
    # summary() find the uncached graph and its reason.
    graph = CompiledGraph([], unmatched=reason)
    opts.handle.add(graph, graph_weights(gm, example_inputs))
    message = f"cachedit: caching disabled for this graph, compiling it uncached: {reason}"
    if cause is None:
        warnings.warn(message, stacklevel=3)
    else:
        opts.handle.warn_once(cause, message, stacklevel=3)

    def run(*args):
        graph.ran()
        return compiled(*args)

    run.cachedit_handle = opts.handle
    return run


def _float_timestep_reason(name: str) -> str:
    return (f"the forward takes {name!r} as a Python float, and the graph is specialised on its value (a graph per "
            "value, each with its own state: nothing would cache, requests would look alike). Pass it as a tensor "
            "(e.g. torch.full((batch,), t)), or cache with cachedit_fx.enable_cache, which passes it as one; with "
            "torch.compile(dynamic=None), the default, the float is a graph input where the inner compiler keeps "
            "it one (inner='eager' always; AOT compilers not where a tensor is built from it, e.g. torch.full)")


def _specialised_timestep() -> str | None:
    """Where Dynamo specialised the graph on a Python float argument named like a timestep, the reason to
    compile it uncached; first Dynamo is asked to trace the float as a graph input instead
    (``capture.scalars.unspecialise`` restarts the trace where automatic dynamic is on)."""
    found = {n: by_dynamo for n, by_dynamo in specialised_floats().items() if timestep_named(n)}
    if not found:
        return None
    name = sorted(found)[0]
    if found[name]:
        unspecialise(name)  # returns only where the float stays specialised
    return _float_timestep_reason(name)


def _why_not_cached(gm, example_inputs) -> str | None:
    if torch.is_grad_enabled():
        return "grad mode is on; caching is inference-only (run under torch.no_grad() or torch.inference_mode())"
    return None


def _warn_if_requests_look_alike(handle, chains) -> None:
    # Without a timestep the graph cannot see where a request ends; a pipeline call or a step count can.
    if handle.resets_per_call or handle.cache_config.num_inference_steps or all(c.timestep for c in chains):
        return
    handle.warn_once("no timestep", "cachedit: no timestep input found (no call argument of at most one dimension "
                     "feeds a sinusoidal embedding, none is named like a timestep): consecutive requests look like "
                     "one. Call cachedit_fx.reset(model) between requests, or set num_inference_steps in "
                     "the cache config (refresh_context can set it per request)", stacklevel=4)


def cachedit_backend(gm: GraphModule, example_inputs, options: dict | None = None):
    """Dynamo backend: ``gm`` with each picked chain's middle behind an on-device decision, compiled."""
    opts = parse_options(options)
    handle = opts.handle
    check_calls(gm)
    reason = _why_not_cached(gm, example_inputs)
    if reason is not None:
        return _uncached(gm, example_inputs, opts, reason)
    reason = _specialised_timestep()
    if reason is not None:
        return _uncached(gm, example_inputs, opts, reason, cause="float timestep")
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), None)
    result = apply(gm, opts.pass_settings(device))
    if not result.modified:
        reason = result.unmatched
        if not handle.islands_checked:
            # A compiled model cannot be changed from here; enable_cache can, before it compiles.
            reason += ("; if a graph break inside every block is the cause (a host sync or a data-dependent "
                       "shape, e.g. a MoE's routing loop or torch.nonzero), cachedit_fx.enable_cache(model) "
                       "caches such models: it makes the breaking submodules opaque islands")
        return _uncached(gm, example_inputs, opts, reason)
    group = chains_group(result.chains)
    if group is not None:
        check_same_config(group, handle.cache_config, handle.calibrator_config)
    floats = {name: sym for name, sym in float_inputs(gm).items() if timestep_named(name)}
    weights = graph_weights(gm, example_inputs)
    try:
        states = StaticStates(result.chains) if is_static(example_inputs) else \
            SizedStates(handle, result.chains, [node_value(p) for p in gm.graph.find_nodes(op="placeholder")], weights)
    except NoCacheableChain as e:  # a state size no call's inputs tell
        return _uncached(gm, example_inputs, opts, str(e))
    if opts.inner == "inductor":
        predecompose(result.graph_module)
    compiled = _compiled(result.graph_module, list(example_inputs) + states.examples(result.graph_module), opts,
                         CACHED_GRAPH_INDUCTOR_OPTIONS)
    specialised = sorted(made_constant(floats))
    if specialised:  # this graph serves one value of the timestep: it cannot tell steps and requests apart
        return _uncached(gm, example_inputs, opts, _float_timestep_reason(specialised[0]), cause="float timestep")
    # Added once compiled: an inner compile Dynamo restarts (AOTAutograd's float tensorify) leaves no chain.
    states.graph = CompiledGraph(result.chains)
    handle.add(states.graph, weights)
    _warn_if_requests_look_alike(handle, result.chains)

    def run(*args):
        return compiled(*args, *states.for_call(args))  # marks the graph holding the call's state as run

    run.cachedit_handle = handle  # the handle lives as long as the compiled graph
    return run
