"""cache-dit 1.5.3's top-level names beyond the configs: ``cache_type`` (its string-to-CacheType helper),
and the names cachedit-fx does not provide, each with the reason, so that a cache-dit script reaching
one after ``import cachedit_fx as cache_dit`` stops at an ``AttributeError`` that says why and what to
use instead (docs/usage.md lists every name)."""
from __future__ import annotations

from ..config import CacheType
from ..errors import ConfigError

_ALIASES = {CacheType.DBCache: ("DUAL_BLOCK_CACHE", "DB_CACHE", "DBCACHE", "DB"),
            CacheType.DBPrune: ("DYNAMIC_BLOCK_PRUNE", "DB_PRUNE", "DBPRUNE", "DBP"),
            CacheType.NONE: ("NONE", "NO_CACHE", "NOCACHE", "NC")}


def cache_type(type_hint: CacheType | str | None) -> CacheType:
    """cache-dit's ``cache_type``: a CacheType from its member or one of cache-dit's spellings.

    Raises:
        ConfigError: an unknown spelling (cache-dit returns ``NONE`` for it, which silently uncaches).
    """
    if type_hint is None:
        return CacheType.NONE
    if isinstance(type_hint, CacheType):
        return type_hint
    found = next((t for t, names in _ALIASES.items() if str(type_hint).upper() in names), None)
    if found is None:
        allowed = ", ".join(n for names in _ALIASES.values() for n in names)
        raise ConfigError(f"cache_type must be a CacheType or one of {allowed} (any case), got {type_hint!r}")
    return found


_OFFLOAD = ("cache-dit's own layer-wise offload; use diffusers' enable_model_cpu_offload / enable_group_offload, "
            "which the cache composes with (docs/usage.md, Weight offload)")
_PROFILER = "cache-dit's profiler wrapper; use torch.profiler directly"
_UTILITY = "a cache-dit utility outside caching; not needed by the cache"
_SUBMODULE = ("a cache-dit subpackage; cachedit-fx's package is laid out by stage (config, compat, capture, "
              "runtime, passes, backend, install, export: docs/architecture.md)")

ABSENT = {
    "ENV": "cache-dit's environment settings; the few CACHE_DIT_* switches that matter here are read where used",
    "LayerwiseOffloadHandle": _OFFLOAD, "LayerwiseOffloadHandleGroup": _OFFLOAD, "layerwise_offload": _OFFLOAD,
    "layerwise_cpu_offload": _OFFLOAD, "get_layerwise_offload_handles": _OFFLOAD, "remove_layerwise_offload": _OFFLOAD,
    "ProfilerContext": _PROFILER, "create_profiler_context": _PROFILER, "profile_function": _PROFILER,
    "get_profiler_output_dir": _PROFILER, "set_profiler_output_dir": _PROFILER,
    "disable_print": _UTILITY, "init_logger": _UTILITY + " (cachedit-fx logs on diffusers' 'diffusers.cachedit_fx')",
    "maybe_empty_cache": _UTILITY + " (torch.cuda.empty_cache)", "version_tuple": _UTILITY + " (cachedit_fx.__version__)",
    "parse_extra_modules": "resolves ParallelismConfig.extra_parallel_modules, which is refused (diffusers' context "
                           "parallelism shards the transformer only)",
    **{name: _SUBMODULE for name in ("attention", "caching", "compile", "distributed", "envs", "kernels", "logger",
                                     "offload", "platforms", "profiler", "quantization", "utils")},
}


def absent(name: str) -> AttributeError:
    """The error for a missing attribute of the package: with the reason when it is a cache-dit name."""
    why = ABSENT.get(name)
    if why is None:
        return AttributeError(f"module 'cachedit_fx' has no attribute {name!r}")
    return AttributeError(f"module 'cachedit_fx' has no attribute {name!r} (cache-dit 1.5.3's {name}: {why})")
