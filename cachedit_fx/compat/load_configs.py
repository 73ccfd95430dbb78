"""cache-dit's config loaders: ``load_configs`` reads one YAML file (or dict) in cache-dit 1.5.3's layout
into the five ``enable_cache`` arguments, as cachedit-fx objects, so ``enable_cache(pipe,
**load_configs(path))`` runs unchanged::

    cache_config: {Fn_compute_blocks: 1, residual_diff_threshold: 0.12, enable_taylorseer: true, ...}
    parallelism_config: {ulysses_size: 2, attention_backend: native}
    attention_backend: native
    quantize_config: {quant_type: int8_weight_only}

cache-dit's rules hold: a file without ``cache_config`` but with another section has no cache config; a
file with none of the sections is the legacy flat cache dict; a ``steps_computation_mask`` may be a
``steps_mask`` preset name when ``num_inference_steps`` is given; ``ulysses`` / ``ring`` / ``tp`` alias the
``*_size`` fields and one size may be ``"auto"`` (the world size over the others). Unlike cache-dit, a key
no config has is refused (``ConfigError`` naming it) instead of ignored.
"""
from __future__ import annotations

import copy
import dataclasses

from ..config import DBCacheConfig, ParallelismConfig, QuantizeConfig, TaylorSeerCalibratorConfig
from ..errors import ConfigError, MissingDependency
from .masks import steps_mask

SECTIONS = ("cache_config", "parallelism_config", "attention_backend", "quantize_config")
# The calibrator keys of the flat cache dict: cache-dit's TaylorSeer spelling, and the calibrators it
# has that cachedit-fx does not run (refused by name).
_TAYLORSEER_KEYS = ("enable_taylorseer", "enable_encoder_taylorseer", "taylorseer_cache_type", "taylorseer_order")
_OTHER_CALIBRATORS = ("enable_dmd", "enable_foca")
_CALIBRATOR_KEYS = {*_TAYLORSEER_KEYS, "enable_encoder_dmd", "enable_encoder_foca", "calibrator_cache_type",
                    "dmd_history", "dmd_rank", "dmd_ridge", "dmd_svd_precision"}


def _read(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    if not isinstance(path_or_dict, str):
        raise ConfigError(f"load_configs: path_or_dict must be a YAML file path or a dict, got "
                          f"{type(path_or_dict).__name__}")
    try:
        import yaml
    except ImportError as e:
        raise MissingDependency("load_configs reads YAML with PyYAML: pip install pyyaml") from e
    try:
        with open(path_or_dict) as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"Configuration file not found: {path_or_dict}") from None


def _calibrator(fields: dict, reset: bool) -> TaylorSeerCalibratorConfig | None:
    chosen = [k for k in ("enable_taylorseer", *_OTHER_CALIBRATORS) if fields.get(k)]
    if len(chosen) > 1:
        raise ConfigError(f"cache config: {chosen} are mutually exclusive; set only one of them to true")
    if chosen and chosen[0] in _OTHER_CALIBRATORS:
        raise ConfigError(f"cache config: {chosen[0]}: cachedit-fx runs the TaylorSeer calibrator only "
                          "(enable_taylorseer)")
    if not chosen:
        return None
    calib = dict(enable_calibrator=fields["enable_taylorseer"],
                 enable_encoder_calibrator=fields.get("enable_encoder_taylorseer", False),
                 calibrator_cache_type=fields.get("taylorseer_cache_type", "residual"),
                 taylorseer_order=fields.get("taylorseer_order", 1))
    return TaylorSeerCalibratorConfig().reset(**calib) if reset else TaylorSeerCalibratorConfig(**calib)


def load_cache_options(fields: dict, reset: bool = False) -> dict:
    """A flat cache dict (cache-dit's legacy spelling) -> ``{"cache_config": ..., "calibrator_config": ...}``
    (the latter only when a calibrator is enabled); ``reset``: partial configs of the given fields."""
    fields = copy.deepcopy(fields)
    out = {}
    calibrator = _calibrator(fields, reset)
    if calibrator is not None:
        out["calibrator_config"] = calibrator
    cache_type = str(fields.pop("cache_type", "DBCache"))
    if cache_type != "DBCache":
        raise ConfigError(f"cache config: cache_type must be 'DBCache' (cache-dit's 'DBPrune' is not run by "
                          f"cachedit-fx), got {cache_type!r}")
    known = {f.name for f in dataclasses.fields(DBCacheConfig)}
    unknown = sorted(set(fields) - known - _CALIBRATOR_KEYS)
    if unknown:
        raise ConfigError(f"cache config: unknown key(s) {unknown}; allowed: the fields of DBCacheConfig and "
                          f"{sorted(_TAYLORSEER_KEYS)}")
    given = {k: v for k, v in fields.items() if k in known and v is not None}
    out["cache_config"] = DBCacheConfig().reset(**given) if reset else DBCacheConfig().update(**given)
    return out


def load_cache_config(path_or_dict, **kwargs) -> tuple[DBCacheConfig | None, TaylorSeerCalibratorConfig | None]:
    """The ``cache_config`` section (or the legacy flat dict) as ``(cache_config, calibrator_config)``."""
    data = _read(path_or_dict)
    if "cache_config" not in data:
        if any(s in data for s in SECTIONS):
            return None, None
        loaded = load_cache_options(data, kwargs.get("reset", False))
        return loaded["cache_config"], loaded.get("calibrator_config")
    section = dict(data["cache_config"] or {})
    if isinstance(section.get("steps_computation_mask"), str):
        if "num_inference_steps" not in section:
            raise ConfigError("cache_config.steps_computation_mask: a mask policy name needs num_inference_steps "
                              "in cache_config")
        section["steps_computation_mask"] = steps_mask(total_steps=section["num_inference_steps"],
                                                       mask_policy=section["steps_computation_mask"])
    loaded = load_cache_options(section, kwargs.get("reset", False))
    return loaded["cache_config"], loaded.get("calibrator_config")


def _auto_sizes(section: dict) -> None:
    """At most one size may be ``"auto"``: the world size over the product of the others (1 without
    torch.distributed)."""
    names = ("ulysses_size", "ring_size", "tp_size")
    auto = [n for n in names if isinstance(section.get(n), str)]
    for name in auto:
        if section[name].lower() != "auto":
            raise ConfigError(f"parallelism_config.{name} must be an int or 'auto', got {section[name]!r}")
    if len(auto) > 1:
        raise ConfigError("parallelism_config: only one of 'ulysses_size', 'ring_size', or 'tp_size' can be 'auto'")
    if auto:
        import torch.distributed as dist

        others = 1
        for n in names:
            others *= (section.get(n) or 1) if n not in auto else 1
        section[auto[0]] = dist.get_world_size() // others if dist.is_available() and dist.is_initialized() else 1


def load_parallelism_config(path_or_dict, **kwargs) -> ParallelismConfig | bool | None:
    """The ``parallelism_config`` section as a ``ParallelismConfig`` (None without one; with
    ``check_only=True``, whether the section is there)."""
    data = _read(path_or_dict)
    if kwargs.get("check_only", False):
        return "parallelism_config" in data
    if "parallelism_config" not in data:
        return None
    section = dict(data["parallelism_config"] or {})
    for alias, name in (("ulysses", "ulysses_size"), ("ring", "ring_size"), ("tp", "tp_size")):
        if alias in section:
            value = section.pop(alias)
            if name in section and section[name] != value:
                raise ConfigError(f"parallelism_config: both {alias} and {name} are set, to different values: "
                                  f"{value} vs {section[name]}")
            section[name] = value
    if kwargs.get("auto_parallel_size", True):
        _auto_sizes(section)
    unknown = sorted(set(section) - set(ParallelismConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"parallelism_config: unknown key(s) {unknown}")
    return ParallelismConfig(**section)


def load_attn_backend_config(path_or_dict, **kwargs) -> str | None:
    """The ``attention_backend`` entry (None without one)."""
    return _read(path_or_dict).get("attention_backend")


def load_quantize_config(path_or_dict, **kwargs) -> QuantizeConfig | None:
    """The ``quantize_config`` section as a ``QuantizeConfig`` (keys that are no field, or None, dropped as
    cache-dit drops them)."""
    data = _read(path_or_dict)
    if "quantize_config" not in data:
        return None
    return QuantizeConfig(**{k: v for k, v in (data["quantize_config"] or {}).items()
                             if k in QuantizeConfig.__dataclass_fields__ and v is not None})


def load_configs(path_or_dict, return_dict: bool = True, **kwargs):
    """Every section of a cache-dit config file (or dict).

    Args:
        path_or_dict: a YAML file path or a dict in cache-dit's layout.
        return_dict: a dict keyed like enable_cache's arguments (else the 5-tuple in that order).
        kwargs: ``reset`` (partial cache configs), ``auto_parallel_size`` (resolve ``"auto"``, default True).

    Returns:
        ``{"cache_config", "calibrator_config", "parallelism_config", "attention_backend", "quantize_config"}``.
    """
    cache, calibrator = load_cache_config(path_or_dict, **kwargs)
    parallel = load_parallelism_config(path_or_dict, **kwargs)
    parallel = None if isinstance(parallel, bool) else parallel
    out = dict(cache_config=cache, calibrator_config=calibrator, parallelism_config=parallel,
               attention_backend=load_attn_backend_config(path_or_dict), quantize_config=load_quantize_config(
                   path_or_dict))
    return out if return_dict else tuple(out.values())


def load_options(path_or_dict, reset: bool = False) -> dict:
    """cache-dit's deprecated flat loader: ``{"cache_config", "calibrator_config"}`` of a flat cache dict."""
    return load_cache_options(_read(path_or_dict), reset)
