"""cachedit-fx: DBCache / TaylorSeer caching for Diffusion Transformers as a torch.compile graph pass.

The names are cache-dit's, so ``import cachedit_fx as cache_dit`` runs a cache-dit script unchanged."""
from .adapter import BlockAdapter
from .aot import export, load
from .api import (ParamsModifier, disable_cache, enable_cache, refresh_context, reset, strify, summary,
                  supported_matrix, supported_pipelines)
from .config import (BasicCacheConfig, CacheType, ChainPolicy, DBCacheConfig, SeparateCFG,
                     TaylorSeerCalibratorConfig)
from .errors import CacheditError, CaptureError, ConfigError, ExportError, MissingDependency, NoCacheableChain
from .forward_pattern import ForwardPattern
from .masks import steps_mask
from .stats import CacheStats
from .tune import TuneResult, tune

NONE, DBCache = CacheType.NONE, CacheType.DBCache
Pattern_0, Pattern_1, Pattern_2, Pattern_3, Pattern_4, Pattern_5 = ForwardPattern

__all__ = [
    "BasicCacheConfig", "BlockAdapter", "CacheStats", "CacheType", "CacheditError", "CaptureError", "ChainPolicy",
    "ConfigError", "DBCache", "DBCacheConfig", "ExportError", "ForwardPattern", "MissingDependency", "NONE",
    "NoCacheableChain", "ParamsModifier", "Pattern_0", "Pattern_1", "Pattern_2", "Pattern_3", "Pattern_4",
    "Pattern_5", "SeparateCFG", "TaylorSeerCalibratorConfig", "TuneResult", "disable_cache", "enable_cache", "export",
    "load", "refresh_context", "reset", "steps_mask", "strify", "summary", "supported_matrix", "supported_pipelines",
    "tune",
]
__version__ = "0.1.0"
