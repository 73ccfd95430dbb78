"""cachedit-fx: DBCache / TaylorSeer caching for Diffusion Transformers as a torch.compile graph pass."""
from .api import ParamsModifier, disable_cache, enable_cache, reset, strify, summary, supported_pipelines
from .config import BasicCacheConfig, DBCacheConfig, TaylorSeerCalibratorConfig

__all__ = [
    "BasicCacheConfig", "DBCacheConfig", "ParamsModifier", "TaylorSeerCalibratorConfig", "disable_cache",
    "enable_cache", "reset", "strify", "summary", "supported_pipelines",
]
__version__ = "0.1.0"
