"""cachedit-fx: DBCache / TaylorSeer caching for Diffusion Transformers as a torch.compile graph pass.

The names are cache-dit's, so ``import cachedit_fx as cache_dit`` runs a cache-dit script unchanged.
The package is laid out as the pipeline: ``config`` and ``compat`` (what users write) -> ``capture`` and
``runtime`` (graphs in, state at every call) -> ``passes`` -> ``backend`` -> ``install`` and ``export``
(how users reach it) -> ``tools``, ``coverage``, ``zoo``, ``digits``; imports point that way only."""
from .compat.adapter import BlockAdapter
from .compat.forward_pattern import ForwardPattern
from .compat.masks import steps_mask
from .compat.stats import CacheStats
from .config import (BasicCacheConfig, CacheType, ChainPolicy, DBCacheConfig, SeparateCFG,
                     TaylorSeerCalibratorConfig)
from .capture.regions import mark as mark_regions, unmark as unmark_regions
from .coverage.status import supported_matrix, supported_pipelines
from .errors import CacheditError, CaptureError, ConfigError, ExportError, MissingDependency, NoCacheableChain
from .export import export, load
from .install.api import (ParamsModifier, disable_cache, enable_cache, refresh_context, reset, strify, summary)
from .tools.tune import TuneResult, tune

NONE, DBCache = CacheType.NONE, CacheType.DBCache
Pattern_0, Pattern_1, Pattern_2, Pattern_3, Pattern_4, Pattern_5 = ForwardPattern

__all__ = [
    "BasicCacheConfig", "BlockAdapter", "CacheStats", "CacheType", "CacheditError", "CaptureError", "ChainPolicy",
    "ConfigError", "DBCache", "DBCacheConfig", "ExportError", "ForwardPattern", "MissingDependency", "NONE",
    "NoCacheableChain", "ParamsModifier", "Pattern_0", "Pattern_1", "Pattern_2", "Pattern_3", "Pattern_4",
    "Pattern_5", "SeparateCFG", "TaylorSeerCalibratorConfig", "TuneResult", "disable_cache", "enable_cache", "export",
    "load", "mark_regions", "refresh_context", "reset", "steps_mask", "strify", "summary", "supported_matrix",
    "supported_pipelines", "tune", "unmark_regions",
]
__version__ = "0.1.0"
