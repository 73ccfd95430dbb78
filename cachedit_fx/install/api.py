"""The one-line API with cache-dit's names: enable_cache / refresh_context / disable_cache / summary /
strify / reset, and how a cached module's handles are found (:func:`cached_handles`).

``enable_cache`` installs a :class:`~cachedit_fx.install.hook.CacheHook` on each transformer *instance* (the
pipeline and transformer classes stay untouched, so two pipelines in one process keep separate state).
Every pipeline call starts a new request (state reset).
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from ..compat.adapter import BlockAdapter
from ..compat.register import BlockAdapterRegister
from ..compat.stats import CacheStats
from ..config import (PRUNE_FIELDS, CacheType, DBCacheConfig, DBPruneConfig, TaylorSeerCalibratorConfig,
                      coerce_cache, coerce_calibrator, merged, strify as config_strify, structural_changes)
from ..errors import ConfigError
from ..runtime.handle import CacheHandle, handles_for, last_request
from ..runtime.stats import cache_stats, collect, plot_diffs, render_stats
from .deploy import deploy
from .hook import CacheHook, cache_hook, install, uninstall
from .parallel import set_attention_backend

TRANSFORMER_ATTRS = ("transformer", "transformer_2")
_CACHE_FIELDS = {f.name for f in dataclasses.fields(DBPruneConfig)}  # DBCacheConfig's and DBPrune's own
_CALIBRATOR_FIELDS = {f.name for f in dataclasses.fields(TaylorSeerCalibratorConfig)}
# cache-dit's older keyword spellings of the calibrator fields
_OLD_CALIBRATOR_NAMES = {"enable_taylorseer": "enable_calibrator", "enable_encoder_taylorseer": "enable_encoder_calibrator",
                         "taylorseer_cache_type": "calibrator_cache_type", "taylorseer_order": "taylorseer_order"}
def configs_from_fields(fields: dict, where: str):
    """Keyword fields (cache-dit's flat spelling) as a partial cache config and a partial calibrator
    config (None where no field of that config was given)."""
    cache = {k: v for k, v in fields.items() if k in _CACHE_FIELDS}
    calib = {_OLD_CALIBRATOR_NAMES.get(k, k): v for k, v in fields.items()
             if k in _CALIBRATOR_FIELDS or k in _OLD_CALIBRATOR_NAMES}
    unknown = sorted(set(fields) - _CACHE_FIELDS - _CALIBRATOR_FIELDS - set(_OLD_CALIBRATOR_NAMES))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: the fields of DBCacheConfig (DBPruneConfig) "
                          "and TaylorSeerCalibratorConfig")
    config_class = DBPruneConfig if set(cache) & set(PRUNE_FIELDS) else DBCacheConfig
    return (config_class().empty(**cache) if cache else None,
            TaylorSeerCalibratorConfig().empty(**calib) if calib else None)


class ParamsModifier:
    """Per-transformer overrides (e.g. Wan 2.2's low-noise expert): a cache config, a calibrator config
    (full, or partial with ``DBCacheConfig().reset(field=...)``), or their fields as keywords."""

    def __init__(self, cache_config=None, calibrator_config=None, **fields):
        cache, calib = configs_from_fields(fields, "ParamsModifier")
        self.cache_config = merged(coerce_cache(cache_config, "ParamsModifier.cache_config"), cache)
        self.calibrator_config = merged(coerce_calibrator(calibrator_config, "ParamsModifier.calibrator_config"),
                                        calib)


def _transformers(obj) -> list[tuple[str | None, torch.nn.Module]]:
    if isinstance(obj, torch.nn.Module):
        return [(None, obj)]
    if isinstance(obj, BlockAdapter):
        return [(None, t) for t in obj.transformers()]
    found = [(a, getattr(obj, a)) for a in TRANSFORMER_ATTRS if isinstance(getattr(obj, a, None), torch.nn.Module)]
    if not found:
        raise ConfigError(f"enable_cache: {type(obj).__name__} has no transformer; pass a diffusers pipeline with "
                          f"one of {TRANSFORMER_ATTRS}, a transformer module or a BlockAdapter")
    return found


def _adapter(pipe_or_adapter) -> BlockAdapter | None:
    """The BlockAdapter given, or one registered for the object's class (BlockAdapterRegister)."""
    if isinstance(pipe_or_adapter, BlockAdapter):
        return pipe_or_adapter
    return BlockAdapterRegister.get_adapter(pipe_or_adapter)


def enable_cache(pipe_or_adapter, cache_config=None, calibrator_config=None, params_modifiers=None,
                 parallelism_config=None, attention_backend=None, quantize_config=None, compile: bool = True,
                 inner: str = "inductor", eager: bool = False, dynamic: bool | None = None,
                 background_compile: bool = False, **fields):
    """Cache a diffusers pipeline, a transformer, or the transformer(s) of a ``BlockAdapter``, in place,
    then apply cache-dit's deployment options in its order (attention backend, parallelism, quantization);
    returns what it was given.

    Args:
        pipe_or_adapter: the pipeline (its ``transformer`` and ``transformer_2``), a transformer module,
            or a ``BlockAdapter`` (whose block lists pin the chain; the graph is checked against them).
        cache_config, calibrator_config: configs or dicts of their fields; cache-dit's flat keyword
            fields (``Fn_compute_blocks=...``, ``enable_taylorseer=...``) are accepted too. As in cache-dit,
            no cache config with a deployment option given installs no cache.
        params_modifiers: a ``ParamsModifier``, or one per transformer.
        parallelism_config: a ``ParallelismConfig``: diffusers' context (or tensor) parallelism.
        attention_backend: a diffusers attention backend name (``set_attention_backend``).
        quantize_config: a ``QuantizeConfig``, applied through torchao (``pip install 'cachedit-fx[quant]'``).
        compile: False runs the rewritten graph without an inner compiler (fast start, same decisions).
        inner: the inner compiler (inductor | aot_eager | eager | tensorrt | a callable).
        eager: cache with hooks on one block list, deciding on the host, instead of the graph pass (what
            a model whose blocks cannot be captured gets on its own, with one warning).
        dynamic: torch.compile's ``dynamic``. None (default): the first call compiles for its sizes, the
            first call at other sizes (a new resolution, batch or text length) compiles once more for every
            size; True: every size from the first compile; False: static shapes, a graph per size.
        background_compile: with Inductor, compile in a child process while the first calls run the
            rewritten graph eagerly (same decisions), then switch to the compiled graph: the first request
            waits for Dynamo's trace, not for Inductor. Static-shape graphs only (a new size compiles here).
    """
    if dynamic not in (None, True, False):
        raise ConfigError(f"enable_cache: dynamic must be None (a second size compiles once for all sizes), True "
                          f"(one compile for all sizes) or False (a graph per size), got {dynamic!r}")
    if background_compile and not compile:
        raise ConfigError("enable_cache: background_compile=True needs compile=True (it moves the Inductor compile "
                          "to a child process); got compile=False")
    flat_cache, flat_calib = configs_from_fields(fields, "enable_cache")
    deployment = dict(parallelism_config=parallelism_config, attention_backend=attention_backend,
                      quantize_config=quantize_config)
    adapter = _adapter(pipe_or_adapter)
    targets = _transformers(adapter or pipe_or_adapter)
    pipe = adapter.pipe if isinstance(pipe_or_adapter, BlockAdapter) else pipe_or_adapter
    is_pipe = pipe is not None and not isinstance(pipe, torch.nn.Module)
    if cache_config is not None or flat_cache is not None or all(v is None for v in deployment.values()):
        cache = merged(coerce_cache(cache_config) or DBCacheConfig(), flat_cache)
        calib = merged(coerce_calibrator(calibrator_config), flat_calib)
        disable_cache(pipe_or_adapter)
        hooks = _install_hooks(targets, adapter, params_modifiers, cache, calib, "eager" if not compile else inner,
                               eager, is_pipe, dynamic, background_compile)
        if is_pipe and hooks:
            _wrap_pipeline_call(pipe, hooks)
    deploy([module for _, module in targets], pipe if is_pipe else None, **deployment)
    return pipe_or_adapter


def background_compiles(module: torch.nn.Module) -> list:
    """The background compiles (``background_compile=True``) of the graphs compiled over ``module``'s
    weights, oldest first. Each has ``status`` ("compiling", "compiled", or why it compiled in this
    process), ``eager_calls`` and ``compiled_calls`` (the calls each form served) and ``wait(timeout)``
    (block until the child exits; the next call switches)."""
    return [job for handle in handles_for(module) for job in handle.background]


def set_attn_backend(pipe_or_adapter, attention_backend: str | None = None) -> None:
    """cache-dit's ``set_attn_backend``: diffusers' ``set_attention_backend`` on each transformer of a
    pipeline, BlockAdapter or transformer (None: nothing changes)."""
    for _, module in _transformers(pipe_or_adapter):
        set_attention_backend(module, attention_backend)


def _install_hooks(targets, adapter: BlockAdapter | None, params_modifiers, cache, calib, inner, eager: bool,
                   is_pipe: bool, dynamic: bool | None, background_compile: bool) -> list[CacheHook]:
    pins = adapter.pins() if adapter else [()] * len(targets)
    if adapter is not None and params_modifiers is None:
        params_modifiers = adapter.params_modifiers
    modifiers = params_modifiers if isinstance(params_modifiers, (list, tuple)) else [params_modifiers] * len(targets)
    if len(modifiers) != len(targets):
        raise ConfigError(f"params_modifiers: got {len(modifiers)} for {len(targets)} transformer(s)")
    hooks = []
    for (attr, module), mod, pinned in zip(targets, modifiers, pins):
        c = merged(cache, mod.cache_config if mod is not None else None)
        k = merged(calib, mod.calibrator_config if mod is not None else None)
        if c.cache_type is CacheType.NONE:
            continue
        hook = CacheHook(c, k, inner, pinned, eager, on_pipeline=is_pipe,
                         separate_hint=adapter is not None and adapter.has_separate_cfg, dynamic=dynamic,
                         background_compile=background_compile)
        hooks.append(install(module, hook))
    return hooks


def _wrap_pipeline_call(pipe, hooks: list[CacheHook]):
    base = type(pipe)
    for hook in hooks:
        hook.handle.resets_per_call = True

    def __call__(self, *args, **kwargs):
        for hook in hooks:
            hook.reset()
        return base.__call__(self, *args, **kwargs)

    # A per-instance subclass: the pipeline class itself is never patched.
    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_cachedit_base": base})


def disable_cache(pipe_or_adapter):
    """Restore the original modules; outputs afterwards equal a never-cached run bit for bit."""
    for _, module in _transformers(pipe_or_adapter):
        if cache_hook(module) is not None:
            uninstall(module)
        elif isinstance(getattr(module, "handle", None), CacheHandle):
            warnings.warn(f"cachedit: {type(module).__name__} is a loaded export package: its cache is inside the "
                          "program, nothing to disable (run the original model to go uncached)", stacklevel=2)
    pipe = pipe_or_adapter.pipe if isinstance(pipe_or_adapter, BlockAdapter) else pipe_or_adapter
    base = type(pipe).__dict__.get("_cachedit_base")
    if base is not None:
        pipe.__class__ = base
    return pipe_or_adapter


def _module_handles(module: torch.nn.Module) -> list[CacheHandle]:
    hook = cache_hook(module)
    if hook is not None:
        return [hook.handle]
    own = getattr(module, "handle", None)  # a loaded export package carries its own
    return [own] if isinstance(own, CacheHandle) else handles_for(module)


def cached_handles(obj) -> list[tuple[str, CacheHandle]]:
    """(name, handle) of every cached transformer of a pipeline, transformer or BlockAdapter: an
    enable_cache install's, a loaded export package's, or those a bare ``backend="cachedit"`` compile
    made over the module's weights."""
    return [(attr or type(module).__name__, h) for attr, module in _transformers(obj) for h in _module_handles(module)]


def reset(obj) -> None:
    """Start a new request: clear counters, references and logs (serving code driving the transformer)."""
    for _, module in _transformers(obj):
        hook = cache_hook(module)
        for h in [hook] if hook is not None else _module_handles(module):
            h.reset()


def refresh_context(obj, num_inference_steps: int | None = None, cache_config=None, calibrator_config=None,
                    verbose: bool = False, **fields) -> None:
    """New settings for the next request, which starts afresh (cache-dit's ``refresh_context``).

    Numbers (threshold, warmup, limits, masks, ``num_inference_steps``) load into the compiled graph's
    state with no recompile. Structural fields (Fn / Bn, per-sample, CFG layout, the calibrator and its
    order) make an ``enable_cache`` install compile again on its next call; a transformer compiled with
    ``torch.compile(backend="cachedit")`` or a loaded export package cannot change them (``ConfigError``).

    Args:
        obj: a pipeline, a transformer or a BlockAdapter that enable_cache (or the backend, or ``load``) cached.
        num_inference_steps: the step count of the next requests.
        cache_config, calibrator_config: full configs replace every field they set (None fields keep the
            current value); partial ones (``DBCacheConfig().reset(field=...)``) only theirs.
        verbose: print the settings now in force.
        fields: single fields of either config (``residual_diff_threshold=0.1``).
    """
    flat_cache, flat_calib = configs_from_fields(
        {**fields, **({} if num_inference_steps is None else {"num_inference_steps": num_inference_steps})},
        "refresh_context")
    targets = [(name, module) for name, module in _transformers(obj) if _module_handles(module)]
    if not targets:
        raise ConfigError(f"refresh_context: {type(obj).__name__} is not cached (call enable_cache first)")
    for name, module in targets:
        hook = cache_hook(module)
        for handle in _module_handles(module):
            new_cache = merged(merged(handle.cache_config, coerce_cache(cache_config)), flat_cache)
            new_calib = merged(merged(handle.calibrator_config, coerce_calibrator(calibrator_config)), flat_calib)
            changed = structural_changes(handle.cache_config, new_cache, handle.calibrator_config, new_calib)
            if changed and hook is None:
                raise ConfigError(f"refresh_context: {', '.join(changed)} are compiled into {name}'s graph, which "
                                  "was not made by enable_cache; compile (or export) again with the new settings")
            if changed:
                hook.reconfigure(new_cache, new_calib)
            else:
                handle.configure(new_cache)
                handle.calibrator_config = new_calib
            handle.reset()
            if verbose:
                print(f"{name}: {config_strify(new_cache, new_calib)}"
                      + (f" (recompiles on the next call: {', '.join(changed)})" if changed else ""))


def strify(obj) -> str:
    """cache-dit's tag of each cached transformer (or of ``summary()``'s stats): its configs (``_CFG1`` when
    it runs separate CFG; DBPrune's ``_P<pruned %>``) and the non-CFG cached steps of the last request
    (``_S<n>``, left out when none cached), joined by commas. A transformer that has run no cached graph yet is tagged by its configs."""
    if isinstance(obj, CacheStats):
        obj = [obj]
    if isinstance(obj, list) and all(isinstance(s, CacheStats) for s in obj):  # summary()'s result
        groups = [(obj[0].cache_options["cache_config"], obj[0].cache_options["calibrator_config"], obj)] if obj else []
    else:
        groups = [(h.cache_config, h.calibrator_config, cache_stats(h, "")) for _, h in cached_handles(obj)]
    parts = []
    for cache, calib, stats in groups:
        if cache.enable_separate_cfg is None:
            cache = dataclasses.replace(cache, enable_separate_cfg=any(s.cfg_steps for s in stats))
        cached = sum(len(s.cached_steps) for s in stats)
        ratio = stats[0].pruned_ratio if stats else None
        parts.append(config_strify(cache, calib, ratio) + (f"_S{cached}" if cached else ""))
    return ",".join(parts)


def summary(obj, details: bool = False, logging: bool = True, plot: str | None = None) -> list[CacheStats]:
    """Per cached transformer and chain, the last request's statistics as cache-dit's ``CacheStats``
    (``cached_steps``, ``residual_diffs``, their ``cfg_`` twins, ``accumulated_*``, ``cache_options``) plus
    the chain, its pattern, Fn/Bn and the gate of every step: of the states the last request ran (each input
    shape keeps one, whether a graph was compiled for it or for dynamic sizes), and with ``details`` of every
    state and their steps in the printed table (``logging``); ``plot`` writes the per-step diff plot."""
    handles = cached_handles(obj)
    only = None if details else last_request([h for _, h in handles])
    stats = [s for name, h in handles for s in cache_stats(h, name, only)]
    if logging:
        if not handles:
            print(f"{type(obj).__name__}: no cachedit graph has run for it yet (call it once after enable_cache or "
                  "torch.compile(..., backend='cachedit'); if it was called, Dynamo ran it uncompiled — look for "
                  "its 'recompile_limit' warning; enable_cache compiles a private copy per model)")
        else:
            print(render_stats(stats, details))
    chains = [c for _, h in handles for c in collect(h)]
    if plot and chains:
        plot_diffs(chains, handles[0][1].cache_config.residual_diff_threshold, plot)
    return stats
