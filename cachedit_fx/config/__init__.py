"""Typed configs with cache-dit's field names (and diffusers' for its indicators), their validation and
compact tags, and the settings the passes compile from them."""
from .cache import REFRESH_POLICIES, STEPS_POLICIES, BasicCacheConfig, CacheType, DBCacheConfig
from .calibrator import (CALIBRATOR_CACHE_TYPES, CALIBRATOR_CLASSES, CALIBRATOR_TYPES, CalibratorConfig,
                         DMDCalibratorConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig, coerce_calibrator)
from .choices import ChainPolicy, SeparateCFG
from .fields import coerce, merged, structural_fields, validated
from .parallelism import ParallelismBackend, ParallelismConfig
from .quantize import QUANT_TYPES, QuantizeBackend, QuantizeConfig
from .indicators import CACHE_CLASSES, INDICATORS, FirstBlockCacheConfig, MagCacheConfig, coerce_cache, indicator_of
from .prune import PRUNE_FIELDS, DBPruneConfig, is_prune
from .settings import (PassSettings, PinnedList, pass_settings, separate_cfg_mode, strify, structural_changes)

__all__ = [
    "BasicCacheConfig", "CACHE_CLASSES", "CALIBRATOR_CACHE_TYPES", "CALIBRATOR_CLASSES", "CALIBRATOR_TYPES",
    "CacheType", "CalibratorConfig", "ChainPolicy", "DBCacheConfig", "DBPruneConfig", "DMDCalibratorConfig",
    "FirstBlockCacheConfig", "FoCaCalibratorConfig", "INDICATORS", "MagCacheConfig", "PRUNE_FIELDS",
    "ParallelismBackend", "ParallelismConfig", "PassSettings", "PinnedList", "QUANT_TYPES", "QuantizeBackend",
    "QuantizeConfig", "REFRESH_POLICIES", "STEPS_POLICIES", "SeparateCFG", "TaylorSeerCalibratorConfig", "coerce",
    "coerce_cache", "coerce_calibrator", "indicator_of", "is_prune", "merged", "pass_settings", "separate_cfg_mode",
    "strify", "structural_changes", "structural_fields", "validated",
]
