"""One-line pipeline API with cache-dit's names: enable_cache / disable_cache / summary / reset.

``enable_cache`` installs a :class:`~cachedit_fx.hook.CacheHook` on each transformer *instance* (the
pipeline and transformer classes stay untouched, so two pipelines in one process keep separate state).
Every pipeline call starts a new request (state reset).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DBCacheConfig, SeparateCFG, TaylorSeerCalibratorConfig, coerce, strify as config_strify
from .errors import ConfigError
from .handle import CacheHandle, handles_for
from .hook import CacheHook, cache_hook, install

TRANSFORMER_ATTRS = ("transformer", "transformer_2")


@dataclass
class ParamsModifier:
    """Per-transformer overrides (e.g. Wan 2.2's low-noise expert): fields of DBCacheConfig."""

    cache_config: DBCacheConfig | dict | None = None
    calibrator_config: TaylorSeerCalibratorConfig | dict | None = None


def _transformers(obj) -> list[tuple[str | None, torch.nn.Module]]:
    if isinstance(obj, torch.nn.Module):
        return [(None, obj)]
    found = [(a, getattr(obj, a)) for a in TRANSFORMER_ATTRS if isinstance(getattr(obj, a, None), torch.nn.Module)]
    if not found:
        raise ConfigError(f"enable_cache: {type(obj).__name__} has no transformer; pass a diffusers pipeline with "
                          f"one of {TRANSFORMER_ATTRS} or a transformer module")
    return found


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
        raise ConfigError(f"params_modifiers: got {len(modifiers)} for {len(targets)} transformer(s)")
    disable_cache(obj)
    is_pipe = not isinstance(obj, torch.nn.Module)
    hooks = []
    for (attr, module), mod in zip(targets, modifiers):
        c, k = cache, calib
        if mod is not None:
            c = coerce(mod.cache_config, DBCacheConfig, "params_modifiers.cache_config") or cache
            k = coerce(mod.calibrator_config, TaylorSeerCalibratorConfig, "params_modifiers.calibrator_config") or calib
        # None (detect) and, for pipelines, True: two state sets, the branch named by cache_context or
        # found on device; True on a bare transformer: calls alternate, as cache-dit does.
        separate = c.enable_separate_cfg
        separate = SeparateCFG.AUTO if separate is None or (separate and is_pipe) else SeparateCFG.parse(
            separate, "enable_separate_cfg")
        hooks.append(install(module, CacheHook(c, k, separate, inner)))
    if is_pipe:
        _wrap_pipeline_call(obj, hooks)
    return obj


def _wrap_pipeline_call(pipe, hooks: list[CacheHook]):
    base = type(pipe)

    def __call__(self, *args, **kwargs):
        for hook in hooks:
            hook.reset()
        return base.__call__(self, *args, **kwargs)

    # A per-instance subclass: the pipeline class itself is never patched.
    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_cachedit_base": base})


def disable_cache(obj):
    """Restore the original modules; outputs afterwards equal a never-cached run bit for bit."""
    for _, module in _transformers(obj):
        hook = cache_hook(module)
        if hook is not None:
            hook.uninstall(module)
    if not isinstance(obj, torch.nn.Module):
        base = type(obj).__dict__.get("_cachedit_base")
        if base is not None:
            obj.__class__ = base
    return obj


def _module_handles(module: torch.nn.Module) -> list[CacheHandle]:
    hook = cache_hook(module)
    if hook is not None:
        return [hook.handle]
    own = getattr(module, "handle", None)  # a loaded export package carries its own
    return [own] if isinstance(own, CacheHandle) else handles_for(module)


def _handles(obj) -> list[tuple[str, CacheHandle]]:
    return [(attr or type(module).__name__, h) for attr, module in _transformers(obj) for h in _module_handles(module)]


def reset(obj) -> None:
    """Start a new request: clear counters, references and logs (serving code driving the transformer)."""
    for _, module in _transformers(obj):
        hook = cache_hook(module)
        for h in [hook] if hook is not None else _module_handles(module):
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

    return sorted({f.pipeline_class for f in zoo.families()})
