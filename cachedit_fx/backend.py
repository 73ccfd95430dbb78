"""The ``cachedit`` Dynamo backend: rewrite the captured graph, then hand it to an inner compiler.

``torch.compile(transformer, backend="cachedit", options={...})`` resolves through the
``torch_dynamo_backends`` entry point. Options: ``cache_config`` and ``calibrator_config`` (objects
or dicts), ``inner`` (inductor | aot_eager | eager | tensorrt), ``separate_cfg`` (True: two state
sets, calls alternate; "auto": two state sets, a call whose timestep repeats the previous call's is
the second of a CFG pair, detected on device; False: one; default from
cache_config.enable_separate_cfg, None meaning "auto"), ``chains``
("longest" | "all"), ``handle`` (a :class:`CacheHandle` that collects the state; enable_cache passes
one). Anything the passes cannot handle compiles uncached with one warning.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from .capture import clone_graph_module
from .config import DBCacheConfig, TaylorSeerCalibratorConfig, coerce
from .passes.patterns import Unmatched, analyze
from .passes.rewrite import RewrittenChain, find_timestep, rewrite

INNER_COMPILERS = ("inductor", "aot_eager", "eager", "tensorrt")
OPTION_KEYS = ("cache_config", "calibrator_config", "inner", "separate_cfg", "chains", "handle", "inner_options")
CHAIN_POLICIES = ("longest", "all")


@dataclass(eq=False)
class CompiledGraph:
    """One compiled graph's chains and the ids of the parameters it was compiled for."""

    chains: list[RewrittenChain]
    param_ptrs: frozenset
    unmatched: str | None = None


@dataclass(eq=False)
class CacheHandle:
    """Everything the backend compiled for one model; what reset / stats / summary read."""

    cache_config: DBCacheConfig
    calibrator_config: TaylorSeerCalibratorConfig | None
    graphs: list[CompiledGraph] = field(default_factory=list)
    islands_checked: bool = False  # enable_cache looked for islands before compiling (islands.py)

    def reset(self) -> None:
        for g in self.graphs:
            for c in g.chains:
                c.state.reset()

    def configure(self, cache_config: DBCacheConfig) -> None:
        """New thresholds / warmup / masks for the next request, with no recompile."""
        cache_config = _validated(coerce(cache_config, DBCacheConfig, "cache_config"))
        self.cache_config = cache_config
        for g in self.graphs:
            for c in g.chains:
                c.state.configure(cache_config)

    @property
    def chains(self) -> list[RewrittenChain]:
        return [c for g in self.graphs for c in g.chains]


_ALL_HANDLES: "weakref.WeakSet[CacheHandle]" = weakref.WeakSet()


def handles_for(module: torch.nn.Module) -> list[CacheHandle]:
    """Handles whose graphs were compiled over this module's parameters."""
    ptrs = {p.data_ptr() for p in module.parameters()}
    return [h for h in list(_ALL_HANDLES) if any(g.param_ptrs & ptrs for g in h.graphs)]


def _validated(config):
    """Config objects are mutable dataclasses: check them again where they are used (a field set
    after construction, e.g. ``cfg.residual_diff_threshold = float("nan")``, skipped the check)."""
    if config is not None:
        config.__post_init__()
    return config


def _weight_ptrs(gm: GraphModule, example_inputs) -> frozenset:
    """Storage of the graph's lifted parameters and buffers: how reset/summary find a module's graphs
    (activations are left out, so a freed input's address can never match a later module)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return frozenset(x.data_ptr() for name, x in zip(names, example_inputs)
                     if isinstance(x, torch.Tensor) and ("_parameters_" in name or "_buffers_" in name))


def parse_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"cachedit backend: unknown option(s) {unknown}; allowed: {list(OPTION_KEYS)}")
    cache = _validated(coerce(options.get("cache_config"), DBCacheConfig, "cache_config") or DBCacheConfig())
    calib = _validated(coerce(options.get("calibrator_config"), TaylorSeerCalibratorConfig, "calibrator_config"))
    inner = options.get("inner", "inductor")
    if inner not in INNER_COMPILERS and not callable(inner):
        raise ValueError(f"inner must be one of {INNER_COMPILERS} or a callable, got {inner!r}")
    if inner == "tensorrt":
        _require_tensorrt()
    chains = options.get("chains", "longest")
    if chains not in CHAIN_POLICIES:
        raise ValueError(f"chains must be one of {CHAIN_POLICIES}, got {chains!r}")
    separate = options.get("separate_cfg", cache.enable_separate_cfg)
    separate = "auto" if separate is None else separate
    if separate not in (True, False, "auto"):
        raise ValueError(f"separate_cfg must be True, False or 'auto', got {separate!r}")
    handle = options.get("handle") or CacheHandle(cache, calib)
    return dict(cache=cache, calib=calib, inner=inner, chains=chains, separate=separate, handle=handle,
                inner_options=options.get("inner_options") or {})


def _require_tensorrt():
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA-less install failing at import
        raise RuntimeError("inner='tensorrt' needs torch-tensorrt and a CUDA GPU: pip install "
                           "'cachedit-fx[tensorrt]' (torch-tensorrt==2.13.0 matches torch 2.13); "
                           f"import failed with: {e}") from e


def inner_compile(gm: GraphModule, example_inputs, inner, inner_options=None):
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    if inner == "tensorrt":
        return _tensorrt_compile(gm, example_inputs, inner_options or {})
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=inner_options or None)


def _tensorrt_compile(gm, example_inputs, inner_options):
    """TensorRT has no converter for torch.cond: compile the graph with the cond kept as a
    higher-order op by Torch-TensorRT's dynamo backend, which partitions unsupported ops (the cond
    and the state glue) to PyTorch and builds engines for the block segments around them."""
    import torch_tensorrt

    return torch_tensorrt.dynamo.compile(torch.export.export(gm, tuple(example_inputs)),
                                         inputs=list(example_inputs), **inner_options)


def _is_static(example_inputs) -> bool:
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            return False
        if isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape):
            return False
    return True


def _fallback(gm, example_inputs, opts, reason: str):
    warnings.warn(f"cachedit: caching disabled for this graph, compiling it uncached: {reason}", stacklevel=3)
    # Record the parameters too, so handles_for(module) / summary() find the uncached graph and its reason.
    ptrs = _weight_ptrs(gm, example_inputs)
    opts["handle"].graphs.append(CompiledGraph([], ptrs, unmatched=reason))
    compiled = inner_compile(gm, example_inputs, opts["inner"], opts["inner_options"])

    def run(*args):
        return compiled(*args)

    run.cachedit_handle = opts["handle"]
    return run


def cachedit_backend(gm: GraphModule, example_inputs, options: dict | None = None):
    opts = parse_options(options)
    handle: CacheHandle = opts["handle"]
    _ALL_HANDLES.add(handle)
    if torch.is_grad_enabled():
        return _fallback(gm, example_inputs, opts, "grad mode is on; caching is inference-only "
                         "(run under torch.no_grad() or torch.inference_mode())")
    if not _is_static(example_inputs):
        return _fallback(gm, example_inputs, opts, "dynamic shapes; compile with dynamic=False so each "
                         "shape gets its own graph and state")
    original, gm = gm, clone_graph_module(gm)
    found = analyze(gm)
    if isinstance(found, Unmatched):
        reason = found.reason
        if not handle.islands_checked:
            # A compiled model cannot be changed from here; enable_cache can, before it compiles.
            reason += ("; if a graph break inside every block is the cause (a host sync or a data-dependent "
                       "shape, e.g. a MoE's routing loop or torch.nonzero), cachedit_fx.enable_cache(model) "
                       "caches such models: it makes the breaking submodules opaque islands")
        return _fallback(original, example_inputs, opts, reason)
    infos = found[:1] if opts["chains"] == "longest" else found
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), None)
    n_branches = 2 if opts["separate"] else 1
    if opts["separate"] == "auto" and find_timestep(gm) is None:
        # A graph after a break (e.g. Lumina2's) may not see the timestep: it cannot tell a CFG pair's
        # second call on device, so it keeps one state set (cond and uncond usually differ in text
        # length and compile to separate graphs, each with its own state).
        n_branches = 1
    try:
        chains = rewrite(gm, infos, opts["cache"], opts["calib"], n_branches, device,
                         branch_by="timestep" if opts["separate"] == "auto" else "parity")
    except ValueError as e:
        if "do not fit chain" in str(e):
            raise
        return _fallback(original, example_inputs, opts, str(e))
    if handle.cache_config is not opts["cache"]:
        # handle.configure() may have run before this graph compiled (compiles are lazy, and a new
        # shape compiles a new graph later): new graphs start from the handle's current numbers.
        for c in chains:
            c.state.configure(handle.cache_config)
    states = [t for c in chains for t in c.state.ordered()]
    ptrs = _weight_ptrs(gm, example_inputs)
    handle.graphs.append(CompiledGraph(chains, ptrs))
    compiled = inner_compile(gm, list(example_inputs) + states, opts["inner"], opts["inner_options"])

    def run(*args):
        return compiled(*args, *states)

    run.cachedit_handle = handle  # the handle lives as long as the compiled graph
    return run
