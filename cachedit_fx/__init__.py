"""cachedit-fx: DBCache / FirstBlockCache / MagCache with TaylorSeer / FoCa / DMD forecasts for Diffusion
Transformers as a torch.compile graph pass.

The names are cache-dit's, so ``import cachedit_fx as cache_dit`` runs a cache-dit script unchanged.
The package is laid out as the pipeline: ``config`` and ``compat`` (what users write) -> ``capture`` and
``runtime`` (graphs in, state at every call) -> ``passes`` -> ``backend`` -> ``install`` and ``export``
(how users reach it) -> ``tools``, ``coverage``, ``zoo``, ``digits``; imports point that way only."""
from .compat.adapter import BlockAdapter
from .compat.compile_configs import set_compile_configs
from .compat.forward_pattern import ForwardPattern
from .compat.load_configs import (load_attn_backend_config, load_cache_config, load_configs, load_options,
                                  load_parallelism_config, load_quantize_config)
from .compat.masks import block_range, steps_mask
from .compat.names import absent as _absent, cache_type
from .compat.patch_functor import PatchFunctor
from .compat.register import BlockAdapterRegister
from .compat.stats import CacheStats
from .capture.regions import mark as mark_regions, unmark as unmark_regions
from .config import (BasicCacheConfig, CacheType, CalibratorConfig, ChainPolicy, DBCacheConfig, DBPruneConfig,
                     DMDCalibratorConfig, FirstBlockCacheConfig, FoCaCalibratorConfig, MagCacheConfig,
                     ParallelismBackend, ParallelismConfig, QuantizeBackend, QuantizeConfig, SeparateCFG,
                     TaylorSeerCalibratorConfig)
from .coverage.status import supported_matrix, supported_pipelines
from .errors import CacheditError, CaptureError, ConfigError, ExportError, MissingDependency, NoCacheableChain
from .export import export, load
from .install.api import (ParamsModifier, background_compiles, disable_cache, enable_cache, refresh_context, reset,
                          set_attn_backend, strify, summary)
from .install.quantize import quantize
from .tools.tune import TuneResult, tune
from .tools.tune_methods import MethodsResult, tune_methods

NONE, DBCache, DBPrune = CacheType.NONE, CacheType.DBCache, CacheType.DBPrune
Pattern_0, Pattern_1, Pattern_2, Pattern_3, Pattern_4, Pattern_5 = ForwardPattern
get_adapter = BlockAdapterRegister.get_adapter

__all__ = [
    "BasicCacheConfig", "BlockAdapter", "BlockAdapterRegister", "CacheStats", "CacheType", "CacheditError",
    "CalibratorConfig", "CaptureError", "ChainPolicy", "ConfigError", "DBCache", "DBCacheConfig", "DBPrune",
    "DBPruneConfig", "DMDCalibratorConfig", "ExportError", "FirstBlockCacheConfig", "FoCaCalibratorConfig",
    "ForwardPattern", "MagCacheConfig", "MethodsResult", "MissingDependency", "NONE", "NoCacheableChain",
    "ParallelismBackend", "ParallelismConfig", "ParamsModifier", "PatchFunctor", "Pattern_0", "Pattern_1",
    "Pattern_2", "Pattern_3", "Pattern_4", "Pattern_5", "QuantizeBackend", "QuantizeConfig", "SeparateCFG",
    "TaylorSeerCalibratorConfig", "TuneResult", "background_compiles", "block_range", "cache_type", "disable_cache", "enable_cache",
    "export", "get_adapter", "load", "load_attn_backend_config", "load_cache_config", "load_configs",
    "load_options", "load_parallelism_config", "load_quantize_config", "mark_regions", "quantize",
    "refresh_context", "reset", "set_attn_backend", "set_compile_configs", "steps_mask", "strify", "summary",
    "supported_matrix", "supported_pipelines", "tune", "tune_methods", "unmark_regions",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """A cache-dit name cachedit-fx does not provide raises an AttributeError saying why."""
    raise _absent(name)
