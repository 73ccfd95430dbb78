"""Typed cache configs with cache-dit's field names, validation and compact tags."""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ConfigError

STEPS_POLICIES = ("dynamic", "static")
REFRESH_POLICIES = ("once", "repeat")
CALIBRATOR_TYPES = ("taylorseer",)
CALIBRATOR_CACHE_TYPES = ("residual", "hidden_states")


class CacheType(enum.Enum):
    """cache-dit's cache types; cachedit-fx runs DBCache (NONE leaves the model uncached)."""

    NONE = "NONE"
    DBCache = "DBCache"
    DBPrune = "DBPrune"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Any, field: str = "cache_type") -> "CacheType":
        if isinstance(value, cls):
            return value
        name = getattr(value, "value", value)  # cache-dit's own CacheType members too
        if isinstance(name, str):
            found = {m.value.upper(): m for m in cls}.get(name.upper())
            if found is not None:
                return found
        _fail(field, "CacheType.DBCache or CacheType.NONE ('DBCache' / 'NONE')", value)


def _fail(field: str, allowed: str, got: Any) -> None:
    raise ConfigError(f"{field} must be {allowed}, got {got!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, f"an int >= {minimum}", value)


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, "a finite number", value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, "True or False", value)


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        _fail(name, "one of " + ", ".join(map(repr, allowed)), value)


class _Config:
    """cache-dit's config methods. ``update`` sets the given fields in place (None skipped, unknown
    names refused); ``empty`` / ``reset`` make a *partial* config, whose given fields alone override a
    base when merged (a ``ParamsModifier``, ``refresh_context``)."""

    def update(self, **changes: Any):
        _check_names(type(self), changes, f"{type(self).__name__}.update")
        for name, value in changes.items():
            if value is not None:
                setattr(self, name, value)
        self.__post_init__()
        return self

    def empty(self, **fields: Any):
        _check_names(type(self), fields, f"{type(self).__name__}.empty")
        partial = dataclasses.replace(self, **fields)
        partial._given = frozenset(fields)
        return partial

    reset = empty

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changes(self) -> dict[str, Any]:
        """What this config changes when merged onto another: its given fields if partial, else every
        field that is not None (cache-dit's merge)."""
        given = getattr(self, "_given", None)
        if given is not None:
            return {name: getattr(self, name) for name in given}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def _check_names(cls: type, fields: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")


def merged(base, override):
    """``base`` with ``override``'s changes applied (neither is modified); ``base`` when no override."""
    if override is None:
        return base
    if base is None:
        return dataclasses.replace(override)
    out = dataclasses.replace(base)
    for name, value in override.changes().items():
        setattr(out, name, value)
    out.__post_init__()
    return out


@dataclass
class DBCacheConfig(_Config):
    """DBCache: run the first ``Fn_compute_blocks`` and last ``Bn_compute_blocks`` blocks every step,
    reuse the middle blocks' residual while the Fn residual changes less than ``residual_diff_threshold``.
    Every field is cache-dit's; docs/algorithm.md says what each does. ``per_sample`` is ours."""

    cache_type: CacheType | str = CacheType.DBCache
    Fn_compute_blocks: int = 8
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_accumulated_residual_diff_threshold: float | None = None
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    enable_separate_cfg: bool | None = None
    cfg_compute_first: bool = False
    cfg_diff_compute_separate: bool = True
    num_inference_steps: int | None = None
    steps_computation_mask: Sequence[int] | None = None
    steps_computation_policy: str = "dynamic"
    force_refresh_step_hint: int | None = None
    force_refresh_step_policy: str = "once"
    per_sample: bool = False

    def __post_init__(self) -> None:
        self.cache_type = CacheType.parse(self.cache_type)
        if self.cache_type is CacheType.DBPrune:
            _fail("cache_type", "CacheType.DBCache or CacheType.NONE (DBPrune is not supported)", self.cache_type)
        _check_int("Fn_compute_blocks", self.Fn_compute_blocks, 1)
        _check_int("Bn_compute_blocks", self.Bn_compute_blocks, 0)
        _check_float("residual_diff_threshold", self.residual_diff_threshold)
        _check_int("max_warmup_steps", self.max_warmup_steps, 0)
        _check_int("warmup_interval", self.warmup_interval, 1)
        _check_int("max_cached_steps", self.max_cached_steps, -1)
        _check_int("max_continuous_cached_steps", self.max_continuous_cached_steps, -1)
        if self.max_accumulated_residual_diff_threshold is not None:
            _check_float("max_accumulated_residual_diff_threshold", self.max_accumulated_residual_diff_threshold)
        if self.enable_separate_cfg not in (None, True, False):
            _fail("enable_separate_cfg", "None (detect), True or False", self.enable_separate_cfg)
        for name in ("cfg_compute_first", "cfg_diff_compute_separate", "per_sample"):
            _check_bool(name, getattr(self, name))
        if self.num_inference_steps is not None:
            _check_int("num_inference_steps", self.num_inference_steps, 1)
        _check_choice("steps_computation_policy", self.steps_computation_policy, STEPS_POLICIES)
        if self.force_refresh_step_hint is not None:
            _check_int("force_refresh_step_hint", self.force_refresh_step_hint, 1)
        _check_choice("force_refresh_step_policy", self.force_refresh_step_policy, REFRESH_POLICIES)
        if self.steps_computation_mask is not None:
            if not isinstance(self.steps_computation_mask, (list, tuple, range)):
                _fail("steps_computation_mask", "a list of 0 and 1 (steps_mask(...) builds one)",
                      self.steps_computation_mask)
            mask = list(self.steps_computation_mask)
            if not mask or any(isinstance(v, bool) or v not in (0, 1) or isinstance(v, float) and v != int(v)
                               for v in mask):
                _fail("steps_computation_mask", "a non-empty sequence of 0 and 1", self.steps_computation_mask)
            if self.steps_computation_policy == "static" and self.max_warmup_steps == 0 and mask[0] == 0:
                _fail("steps_computation_mask", "1 at step 0 with policy 'static' and no warmup "
                      "(step 0 has nothing cached to reuse)", mask[:4])
            self.steps_computation_mask = [int(v) for v in mask]

    def strify(self) -> str:
        """cache-dit's tag, e.g. ``DBCache_F8B0_W8I1M0MC0_R0.08`` (plus mask, step count, refresh, CFG)."""
        tag = (f"{self.cache_type}_F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}"
               f"_W{self.max_warmup_steps}I{self.warmup_interval}"
               f"M{max(0, self.max_cached_steps)}MC{max(0, self.max_continuous_cached_steps)}"
               f"_R{self.residual_diff_threshold}")
        if self.steps_computation_mask is not None:
            tag += f"_SCM{''.join(map(str, self.steps_computation_mask))}_{self.steps_computation_policy}"
        if self.num_inference_steps is not None:
            tag += f"_N{self.num_inference_steps}"
        if self.force_refresh_step_hint is not None:
            tag += f"_FR{self.force_refresh_step_hint}_{self.force_refresh_step_policy}"
        if self.enable_separate_cfg is not None:
            tag += f"_CFG{int(self.enable_separate_cfg)}"
        return tag


BasicCacheConfig = DBCacheConfig


@dataclass
class TaylorSeerCalibratorConfig(_Config):
    """Forecast the cached middle residuals (or hidden states) with a Taylor series over the computed
    steps. Every field is cache-dit's."""

    enable_calibrator: bool = True
    enable_encoder_calibrator: bool = True
    calibrator_type: str = "taylorseer"
    calibrator_cache_type: str = "residual"
    calibrator_kwargs: dict = dataclasses.field(default_factory=dict)
    taylorseer_order: int = 1

    def __post_init__(self) -> None:
        _check_int("taylorseer_order", self.taylorseer_order, 1)
        if self.taylorseer_order > 8:
            _fail("taylorseer_order", "an int in 1..8", self.taylorseer_order)
        for name in ("enable_calibrator", "enable_encoder_calibrator"):
            _check_bool(name, getattr(self, name))
        _check_choice("calibrator_type", self.calibrator_type, CALIBRATOR_TYPES)
        _check_choice("calibrator_cache_type", self.calibrator_cache_type, CALIBRATOR_CACHE_TYPES)
        if not isinstance(self.calibrator_kwargs, dict):
            _fail("calibrator_kwargs", "a dict", self.calibrator_kwargs)
        order = self.calibrator_kwargs.get("n_derivatives", self.taylorseer_order)
        if set(self.calibrator_kwargs) - {"n_derivatives"} or order != self.taylorseer_order:
            _fail("calibrator_kwargs", "{} or {'n_derivatives': taylorseer_order} (the TaylorSeer order is "
                  "taylorseer_order)", self.calibrator_kwargs)

    def strify(self) -> str:
        return f"T1O{self.taylorseer_order}"


def coerce(value: Any, cls: type, field: str):
    """Accept a config object, a dict of its fields, or None (defaults)."""
    if value is None:
        return None
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{field}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**value)
    raise ConfigError(f"{field} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def strify(cache_config: DBCacheConfig, calibrator_config: TaylorSeerCalibratorConfig | None = None) -> str:
    """cache-dit's tag of a cache and calibrator config pair (``T0O0`` without a calibrator)."""
    return f"{cache_config.strify()}_{calibrator_config.strify() if calibrator_config is not None else 'T0O0'}"


class _Choice(str, enum.Enum):
    """An option with a few named values; :meth:`parse` also takes the spellings users write."""

    @classmethod
    def parse(cls, value: Any, field: str):
        if isinstance(value, cls):
            return value
        aliases = cls._aliases()
        for key, member in aliases:
            if value is key or (isinstance(value, str) and value == key):
                return member
        allowed = ", ".join(repr(k) for k, _ in aliases)
        raise ConfigError(f"{field} must be one of {allowed}, got {value!r}")

    @classmethod
    def _aliases(cls) -> list[tuple[Any, "_Choice"]]:
        return [(m.value, m) for m in cls]


class SeparateCFG(_Choice):
    """How calls map to CFG branches: ``OFF`` one state set; ``ON`` two, calls alternate (or follow
    diffusers' ``cache_context``); ``AUTO`` two, a call whose timestep repeats the previous call's is the
    second of a CFG pair, told on device (one set where the graph has no timestep)."""

    OFF = "off"
    ON = "on"
    AUTO = "auto"

    @classmethod
    def _aliases(cls):
        return [(False, cls.OFF), (True, cls.ON), (None, cls.AUTO), *super()._aliases()]


class ChainPolicy(_Choice):
    """Which block chains of a graph get cached: the ``LONGEST`` one, or ``ALL``."""

    LONGEST = "longest"
    ALL = "all"


# Fields compiled into the graph; the others are numbers in a state tensor.
STRUCTURAL_FIELDS = ("cache_type", "Fn_compute_blocks", "Bn_compute_blocks", "per_sample", "enable_separate_cfg",
                     "cfg_diff_compute_separate")
STRUCTURAL_CALIBRATOR_FIELDS = ("enable_calibrator", "enable_encoder_calibrator", "calibrator_cache_type",
                                "taylorseer_order")


def structural_changes(old_cache: DBCacheConfig, new_cache: DBCacheConfig,
                       old_calib: TaylorSeerCalibratorConfig | None = None,
                       new_calib: TaylorSeerCalibratorConfig | None = None) -> list[str]:
    """The fields that differ and are compiled into the graph (a change needs a new compile)."""
    changed = [f for f in STRUCTURAL_FIELDS if getattr(old_cache, f) != getattr(new_cache, f)]
    if (old_calib is None) != (new_calib is None):
        changed.append("calibrator_config")
    elif old_calib is not None:
        changed += [f for f in STRUCTURAL_CALIBRATOR_FIELDS if getattr(old_calib, f) != getattr(new_calib, f)]
    return changed


def validated(config):
    """``config`` checked again where it is used: config objects are mutable dataclasses, and a field
    set after construction (``cfg.residual_diff_threshold = float("nan")``) skipped the check."""
    if config is not None:
        config.__post_init__()
    return config
