"""One-line pipeline API with cache-dit's names: enable_cache / disable_cache / summary / reset.

``enable_cache`` compiles each transformer's forward with the ``cachedit`` backend and installs it on
the *instance* (the pipeline and transformer classes stay untouched, so two pipelines in one process
keep separate state). Every pipeline call starts a new request (state reset).
"""
from __future__ import annotations

import contextlib
import inspect
import types
import warnings
from dataclasses import dataclass, field

import torch

from . import islands
from .backend import CacheHandle, cachedit_backend, handles_for, parse_options
from .config import DBCacheConfig, TaylorSeerCalibratorConfig, coerce, strify as config_strify

TRANSFORMER_ATTRS = ("transformer", "transformer_2")
# Graphs one install may compile (one per input shape, e.g. resolution or text length, each with its own
# state) before calls with new shapes run uncached; Dynamo's default of 8 is low for serving.
MAX_GRAPHS = 64


@dataclass
class ParamsModifier:
    """Per-transformer overrides (e.g. Wan 2.2's low-noise expert): fields of DBCacheConfig."""

    cache_config: DBCacheConfig | dict | None = None
    calibrator_config: TaylorSeerCalibratorConfig | dict | None = None


@dataclass(eq=False)
class _Installed:
    module: torch.nn.Module
    handle: CacheHandle
    branch_of_call: list = field(default_factory=lambda: [None])
    separate: bool | str = False
    calls: int = 0  # transformer calls in this request
    islands: list = field(default_factory=list)  # submodules made opaque to Dynamo (islands.py)
    over_limit: bool = False  # warned that new shapes run uncached (MAX_GRAPHS)

    def reset(self) -> None:
        self.calls = 0
        self.handle.reset()


def _transformers(obj) -> list[tuple[str | None, torch.nn.Module]]:
    if isinstance(obj, torch.nn.Module):
        return [(None, obj)]
    found = [(a, getattr(obj, a)) for a in TRANSFORMER_ATTRS if isinstance(getattr(obj, a, None), torch.nn.Module)]
    if not found:
        raise ValueError(f"enable_cache: {type(obj).__name__} has no transformer; pass a diffusers pipeline with "
                         f"one of {TRANSFORMER_ATTRS} or a transformer module")
    return found


def _own_code(method):
    """``method`` rebound on a private copy of its function's code object.

    Dynamo keeps compiled entries, and counts ``recompile_limit`` (8), per code object. The code compiled
    here is shared by every transformer of a class, and by all diffusers transformers whose forward is
    wrapped by its peft ``apply_lora_scale`` decorator; compiling it directly made the 9th enable_cache in
    a process hit the limit and silently run eager (uncached, no warning). A private copy gives each
    install its own entries, freed with it.
    """
    if not isinstance(method, types.MethodType) or not isinstance(method.__func__, types.FunctionType):
        return method
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__dict__.update(f.__dict__)
    g.__qualname__, g.__module__, g.__doc__ = f.__qualname__, f.__module__, f.__doc__
    return types.MethodType(g, method.__self__)


def _install(module, cache, calib, separate, inner: str) -> _Installed:
    handle = CacheHandle(cache, calib, islands_checked=True)
    options = dict(cache_config=cache, calibrator_config=calib, inner=inner, separate_cfg=separate, handle=handle)
    parse_options(options)  # fail now, not at the first call
    original = module.forward
    inst = _Installed(module, handle, separate=separate)
    hint = [None]

    def set_hints(chains):
        branch = hint[0]
        for chain in chains:
            chain.state.tensors["branch_hint"].fill_(-1 if branch is None else branch)

    def backend(gm, example_inputs):
        # A graph compiled during this call (a new shape, e.g. the uncond call's text length) runs right
        # after compiling: give its fresh state the current call's branch too, not the default -1.
        before = len(handle.chains)
        fn = cachedit_backend(gm, example_inputs, options)
        set_hints(handle.chains[before:])
        return fn

    def one_graph_backend(gm, example_inputs):
        new = islands.needed_for_graph(module, gm)
        if new:  # e.g. torch.nonzero inside every block: made opaque, then traced again
            raise islands.IslandsNeeded({type(m) for m in new})
        return backend(gm, example_inputs)

    compiled = [None]  # set on the first call: a one-graph compile if the forward allows it
    with_grad = []  # calls made with grad enabled before any inference call

    def compile_and_run(args, kwargs):
        """The first call compiles the forward as ONE graph, turning submodules that break it inside
        every block into islands (islands.py) until it fits; a forward that still breaks (e.g. after
        the blocks) compiles with graph breaks instead. Models that fit at once are traced once."""
        for _ in range(8):
            fn = compile_forward(one_graph_backend, fullgraph=True)
            try:
                out = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a break, or the backend asking for islands
                handle.graphs.clear()
                new = islands.needed_for_error(module, e)
                if not new:
                    break
                inst.islands.extend(islands.install_all(new))
                continue
            compiled[0] = fn
            return out
        return run_with_breaks(args, kwargs)

    def compile_forward(backend_fn, fullgraph=False):
        return torch.compile(_own_code(original), backend=backend_fn, dynamic=False, fullgraph=fullgraph,
                             recompile_limit=MAX_GRAPHS)

    def run_with_breaks(args, kwargs):
        compiled[0] = compile_forward(backend)
        return compiled[0](*args, **kwargs)

    def forward(*args, **kwargs):
        # diffusers' cache_context("cond"/"uncond") names the branch; without it (Chroma, Lumina2, a
        # bare transformer) the graph tells a CFG pair's second call on device by its repeated timestep.
        branch = inst.branch_of_call[0]
        inst.calls += 1
        hint[0] = branch
        set_hints(handle.chains)
        if compiled[0] is None and torch.is_grad_enabled():
            # Caching is inference-only (the backend compiles uncached under grad) and islands have no
            # backward: leave the one-graph compile and island search to the first no-grad call.
            if not with_grad:
                with_grad.append(compile_forward(backend))
            return with_grad[0](*args, **kwargs)
        if compiled[0] is None:
            return compile_and_run(args, kwargs)
        try:
            return compiled[0](*args, **kwargs)
        except torch._dynamo.exc.Unsupported:
            # A later recompile (new shape, grad mode) of a one-graph compile met a graph break.
            return run_with_breaks(args, kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not inst.over_limit:
                inst.over_limit = True
                warnings.warn(f"cachedit: {type(module).__name__} has compiled {MAX_GRAPHS} graphs (input shapes); "
                              "calls with further shapes run uncached (raise cachedit_fx.api.MAX_GRAPHS before "
                              "enable_cache to keep more)", stacklevel=2)
            return original(*args, **kwargs)

    if hasattr(module, "cache_context"):
        original_context = module.cache_context

        @contextlib.contextmanager
        def cache_context(name, **kw):
            inst.branch_of_call[0] = {"cond": 0, "uncond": 1}.get(name) if separate else None
            if cache.cfg_compute_first and inst.branch_of_call[0] is not None:
                inst.branch_of_call[0] = 1 - inst.branch_of_call[0]
            try:
                with original_context(name, **kw):
                    yield
            finally:
                inst.branch_of_call[0] = None

        module.cache_context = cache_context
    module.forward = forward
    module._cachedit = inst
    return inst


def enable_cache(obj, cache_config=None, calibrator_config=None, params_modifiers=None, compile: bool = True,
                 inner: str = "inductor"):
    """Cache ``obj`` (a diffusers pipeline or a transformer) in place and return it.

    ``compile=False`` runs the rewritten graph without an inner compiler (fast start, same decisions).
    ``params_modifiers``: a ParamsModifier, or a list with one per transformer (transformer, transformer_2).
    """
    cache = coerce(cache_config, DBCacheConfig, "cache_config") or DBCacheConfig()
    calib = coerce(calibrator_config, TaylorSeerCalibratorConfig, "calibrator_config")
    if not compile:
        inner = "eager"
    targets = _transformers(obj)
    modifiers = params_modifiers if isinstance(params_modifiers, (list, tuple)) else [params_modifiers] * len(targets)
    if len(modifiers) != len(targets):
        raise ValueError(f"params_modifiers: got {len(modifiers)} for {len(targets)} transformer(s)")
    if getattr(obj, "_cachedit", None) is not None:
        disable_cache(obj)
    is_pipe = not isinstance(obj, torch.nn.Module)
    installed = []
    for (attr, module), mod in zip(targets, modifiers):
        c, k = cache, calib
        if mod is not None:
            c = coerce(mod.cache_config, DBCacheConfig, "params_modifiers.cache_config") or cache
            k = coerce(mod.calibrator_config, TaylorSeerCalibratorConfig, "params_modifiers.calibrator_config") or calib
        # None (detect) and, for pipelines, True: two state sets, the branch named by cache_context or
        # found on device; True on a bare transformer: calls alternate, as cache-dit does.
        separate = c.enable_separate_cfg
        separate = "auto" if separate is None or (separate and is_pipe) else separate
        installed.append(_install(module, c, k, separate, inner))
    if is_pipe:
        _wrap_pipeline_call(obj, installed)
    return obj


def _wrap_pipeline_call(pipe, installed):
    base = type(pipe)

    def __call__(self, *args, **kwargs):
        for inst in installed:
            inst.reset()
        return base.__call__(self, *args, **kwargs)

    # A per-instance subclass: the pipeline class itself is never patched.
    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_cachedit_base": base})
    pipe._cachedit = installed


def disable_cache(obj):
    """Restore the original modules; outputs afterwards equal a never-cached run bit for bit."""
    for _, module in _transformers(obj):
        inst = module.__dict__.pop("_cachedit", None)
        module.__dict__.pop("forward", None)
        module.__dict__.pop("cache_context", None)
        if inst is not None:
            inst.handle.graphs.clear()
            for m in inst.islands:
                islands.uninstall(m)
            inst.islands.clear()
    if not isinstance(obj, torch.nn.Module):
        base = type(obj).__dict__.get("_cachedit_base")
        if base is not None:
            obj.__class__ = base
        obj.__dict__.pop("_cachedit", None)
    return obj


def _handles(obj) -> list[tuple[str, CacheHandle]]:
    out = []
    for attr, module in _transformers(obj):
        inst = module.__dict__.get("_cachedit")
        hs = [inst.handle] if inst is not None else handles_for(module)
        out.extend((attr or type(module).__name__, h) for h in hs)
    return out


def reset(obj) -> None:
    """Start a new request: clear counters, references and logs (serving code driving the transformer)."""
    for _, module in _transformers(obj):
        inst = module.__dict__.get("_cachedit")
        if inst is not None:
            inst.calls = 0
    for _, h in _handles(obj):
        h.reset()


def strify(obj) -> str:
    from .stats import collect

    parts = []
    for _, h in _handles(obj):
        cached = sum(s.cached_steps for s in collect(h))
        parts.append(f"{config_strify(h.cache_config, h.calibrator_config)}_S{cached}")
    return ",".join(parts)


def summary(obj, details: bool = False, plot: str | None = None) -> list[dict]:
    """Per transformer, chain and CFG branch: pattern, blocks, Fn/Bn, cached steps, diff percentiles
    (and per-step diffs with ``details=True``). Prints a table and returns the rows."""
    from .stats import collect, plot_diffs

    rows, all_stats, threshold = [], [], None
    handles = _handles(obj)
    if not handles:
        print(f"{type(obj).__name__}: no cachedit graph has run for it yet (call it once after enable_cache or "
              "torch.compile(..., backend='cachedit'); if it was called, Dynamo ran it uncompiled — look for "
              "its 'recompile_limit' warning; enable_cache compiles a private copy per model)")
    for name, h in handles:
        threshold = h.cache_config.residual_diff_threshold
        for g in h.graphs:
            if g.unmatched:
                rows.append({"transformer": name, "unmatched": g.unmatched})
        for s in collect(h):
            all_stats.append(s)
            row = {"transformer": name, "chain": s.chain, "pattern": s.pattern, "blocks": s.n_blocks,
                   "Fn": s.fn, "Bn": s.bn, "branch": s.branch, "steps": s.steps, "cached_steps": s.cached_steps,
                   "diffs": s.diff_percentiles()}
            if details:
                row["per_step"] = [{"diff": d, "cached": c, "gate": g} for d, c, g in zip(s.diffs, s.cached, s.gates)]
            rows.append(row)
    for r in rows:
        if "unmatched" in r:
            print(f"{r['transformer']}: uncached graph ({r['unmatched']})")
            continue
        p = ", ".join(f"{k}={v:.3f}" for k, v in r["diffs"].items())
        print(f"{r['transformer']} {r['chain']} pattern {r['pattern']} F{r['Fn']}B{r['Bn']} branch {r['branch']}: "
              f"cached {r['cached_steps']}/{r['steps']} steps; diff {p}")
    if plot and all_stats:
        plot_diffs(all_stats, threshold, plot)
    return rows


def supported_pipelines() -> list[str]:
    """The diffusers pipelines of the offline zoo, which the test suite runs through enable_cache."""
    from .testing import zoo

    return sorted({zoo.pipeline_class_name(name) for name in zoo.FAMILY_NAMES})
