"""cachedit-fx: DBCache / TaylorSeer caching for Diffusion Transformers as a torch.compile graph pass."""
from .api import ParamsModifier, disable_cache, enable_cache, reset, strify, summary, supported_pipelines
from .config import BasicCacheConfig, ChainPolicy, DBCacheConfig, SeparateCFG, TaylorSeerCalibratorConfig
from .errors import CacheditError, CaptureError, ConfigError, ExportError, NoCacheableChain

__all__ = [
    "BasicCacheConfig", "CacheditError", "CaptureError", "ChainPolicy", "ConfigError", "DBCacheConfig", "ExportError",
    "NoCacheableChain", "ParamsModifier", "SeparateCFG", "TaylorSeerCalibratorConfig", "disable_cache",
    "enable_cache", "reset", "strify", "summary", "supported_pipelines",
]
__version__ = "0.1.0"
