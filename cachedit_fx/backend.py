"""The ``cachedit`` Dynamo backend: rewrite the captured graph, then hand it to an inner compiler.

``torch.compile(transformer, backend="cachedit", options={...})`` resolves through the
``torch_dynamo_backends`` entry point. Options: ``cache_config`` and ``calibrator_config`` (objects
or dicts), ``inner`` (inductor | aot_eager | eager | tensorrt | a callable), ``inner_options`` (passed to
the inner compiler), ``separate_cfg`` (True / "on": two state sets, calls alternate; "auto" or None: two
state sets, a call whose timestep repeats the previous call's is the second of a CFG pair, told on
device; False / "off": one; default from cache_config.enable_separate_cfg), ``chains`` ("longest" |
"all"), ``blocks`` (the ModuleList paths of the one chain to cache, e.g. ``["transformer_blocks",
"single_transformer_blocks"]``, or :class:`~cachedit_fx.passes.PinnedList` entries with a pattern: what a
``BlockAdapter`` pins; checked against the graph), ``handle`` (a :class:`~cachedit_fx.handle.CacheHandle`
that collects the state; enable_cache passes one). Anything the passes cannot handle compiles uncached
with one warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from .config import ChainPolicy, DBCacheConfig, SeparateCFG, TaylorSeerCalibratorConfig, coerce, validated
from .errors import ConfigError
from .handle import CacheHandle, CompiledGraph, weight_ptrs
from .inner import CACHED_GRAPH_INDUCTOR_OPTIONS, check_inner, inner_compile
from .parallel import chains_group, check_same_config
from .passes import PassSettings, PinnedList, apply

OPTION_KEYS = ("cache_config", "calibrator_config", "inner", "separate_cfg", "chains", "blocks", "handle",
               "inner_options", "process_group")


@dataclass(frozen=True)
class BackendOptions:
    """The backend's options, checked."""

    cache_config: DBCacheConfig
    calibrator_config: TaylorSeerCalibratorConfig | None
    separate_cfg: SeparateCFG
    chains: ChainPolicy
    inner: Any
    inner_options: dict
    handle: CacheHandle
    pinned: tuple[PinnedList, ...] = ()
    group: str | None = None

    def pass_settings(self, device=None) -> PassSettings:
        return PassSettings(self.cache_config, self.calibrator_config, self.separate_cfg, self.chains, device,
                            self.pinned, self.group)


def _pinned(blocks) -> tuple[PinnedList, ...]:
    blocks = [blocks] if isinstance(blocks, (str, PinnedList)) else list(blocks or ())
    if not all(isinstance(b, (str, PinnedList)) for b in blocks):
        raise ConfigError(f"blocks must be ModuleList paths (str) or PinnedList entries, got {blocks!r}")
    return tuple(b if isinstance(b, PinnedList) else PinnedList(b) for b in blocks)


def _group_name(group) -> str | None:
    """A process group (or its name) the sequence is sharded over; None: found from the graph."""
    if group is None or isinstance(group, str):
        return group
    name = getattr(group, "group_name", None)
    if not isinstance(name, str):
        raise ConfigError(f"process_group must be a torch.distributed ProcessGroup or its name, got {group!r}")
    return name


def parse_options(options: dict | None) -> BackendOptions:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"cachedit backend: unknown option(s) {unknown}; allowed: {list(OPTION_KEYS)}")
    cache = validated(coerce(options.get("cache_config"), DBCacheConfig, "cache_config") or DBCacheConfig())
    calib = validated(coerce(options.get("calibrator_config"), TaylorSeerCalibratorConfig, "calibrator_config"))
    inner = options.get("inner", "inductor")
    check_inner(inner)
    return BackendOptions(
        cache_config=cache, calibrator_config=calib,
        separate_cfg=SeparateCFG.parse(options.get("separate_cfg", cache.enable_separate_cfg), "separate_cfg"),
        chains=ChainPolicy.parse(options.get("chains", "longest"), "chains"),
        inner=inner, inner_options=options.get("inner_options") or {},
        handle=options.get("handle") or CacheHandle(cache, calib), pinned=_pinned(options.get("blocks")),
        group=_group_name(options.get("process_group")))


def _is_static(example_inputs) -> bool:
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            return False
        if isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape):
            return False
    return True


def _uncached(gm, example_inputs, opts: BackendOptions, reason: str):
    warnings.warn(f"cachedit: caching disabled for this graph, compiling it uncached: {reason}", stacklevel=3)
    # Recorded too, so handles_for(module) / summary() find the uncached graph and its reason.
    opts.handle.add(CompiledGraph([], weight_ptrs(gm, example_inputs), unmatched=reason))
    compiled = inner_compile(gm, example_inputs, opts.inner, opts.inner_options)

    def run(*args):
        return compiled(*args)

    run.cachedit_handle = opts.handle
    return run


def _why_not_cached(gm, example_inputs) -> str | None:
    if torch.is_grad_enabled():
        return "grad mode is on; caching is inference-only (run under torch.no_grad() or torch.inference_mode())"
    if not _is_static(example_inputs):
        return "dynamic shapes; compile with dynamic=False so each shape gets its own graph and state"
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
    reason = _why_not_cached(gm, example_inputs)
    if reason is not None:
        return _uncached(gm, example_inputs, opts, reason)
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
    handle.add(CompiledGraph(result.chains, weight_ptrs(gm, example_inputs)))
    _warn_if_requests_look_alike(handle, result.chains)
    states = [t for c in result.chains for t in c.state.ordered()]
    compiled = inner_compile(result.graph_module, list(example_inputs) + states, opts.inner, opts.inner_options,
                             CACHED_GRAPH_INDUCTOR_OPTIONS)

    def run(*args):
        return compiled(*args, *states)

    run.cachedit_handle = handle  # the handle lives as long as the compiled graph
    return run
