"""Typed cache configs with cache-dit's field names, validation and compact tags."""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ConfigError

STEPS_POLICIES = ("dynamic", "static")


def _fail(field: str, allowed: str, got: Any) -> None:
    raise ConfigError(f"{field} must be {allowed}, got {got!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, f"an int >= {minimum}", value)


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, "a finite number", value)


@dataclass
class DBCacheConfig:
    """DBCache: run the first ``Fn_compute_blocks`` and last ``Bn_compute_blocks`` blocks every step,
    reuse the middle blocks' residual while the Fn residual changes less than ``residual_diff_threshold``."""

    Fn_compute_blocks: int = 8
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    max_accumulated_residual_diff_threshold: float | None = None
    enable_separate_cfg: bool | None = None
    cfg_compute_first: bool = False
    cfg_diff_compute_separate: bool = True
    steps_computation_mask: Sequence[int] | None = None
    steps_computation_policy: str = "dynamic"
    per_sample: bool = False

    def __post_init__(self) -> None:
        _check_int("Fn_compute_blocks", self.Fn_compute_blocks, 1)
        _check_int("Bn_compute_blocks", self.Bn_compute_blocks, 0)
        _check_float("residual_diff_threshold", self.residual_diff_threshold)
        _check_int("max_warmup_steps", self.max_warmup_steps, 0)
        _check_int("warmup_interval", self.warmup_interval, 1)
        _check_int("max_cached_steps", self.max_cached_steps, -1)
        _check_int("max_continuous_cached_steps", self.max_continuous_cached_steps, -1)
        if self.max_accumulated_residual_diff_threshold is not None:
            _check_float("max_accumulated_residual_diff_threshold", self.max_accumulated_residual_diff_threshold)
        for name in ("enable_separate_cfg",):
            if getattr(self, name) not in (None, True, False):
                _fail(name, "None (detect), True or False", getattr(self, name))
        for name in ("cfg_compute_first", "cfg_diff_compute_separate", "per_sample"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        if self.steps_computation_policy not in STEPS_POLICIES:
            _fail("steps_computation_policy", "one of " + ", ".join(map(repr, STEPS_POLICIES)),
                  self.steps_computation_policy)
        if self.steps_computation_mask is not None:
            mask = list(self.steps_computation_mask)
            if not mask or any(v not in (0, 1) or isinstance(v, float) and v != int(v) for v in mask):
                _fail("steps_computation_mask", "a non-empty sequence of 0 and 1", self.steps_computation_mask)
            if self.steps_computation_policy == "static" and self.max_warmup_steps == 0 and mask[0] == 0:
                _fail("steps_computation_mask", "1 at step 0 with policy 'static' and no warmup "
                      "(step 0 has nothing cached to reuse)", mask[:4])
            self.steps_computation_mask = [int(v) for v in mask]

    def strify(self) -> str:
        return (f"DBCache_F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}"
                f"_W{self.max_warmup_steps}I{self.warmup_interval}"
                f"M{max(0, self.max_cached_steps)}MC{max(0, self.max_continuous_cached_steps)}"
                f"_R{self.residual_diff_threshold:g}")

    def update(self, **changes: Any) -> "DBCacheConfig":
        return dataclasses.replace(self, **changes)


BasicCacheConfig = DBCacheConfig


@dataclass
class TaylorSeerCalibratorConfig:
    """Forecast the cached middle residuals with a Taylor series over the computed steps."""

    taylorseer_order: int = 1
    enable_calibrator: bool = True
    enable_encoder_calibrator: bool = True

    def __post_init__(self) -> None:
        _check_int("taylorseer_order", self.taylorseer_order, 1)
        if self.taylorseer_order > 8:
            _fail("taylorseer_order", "an int in 1..8", self.taylorseer_order)
        for name in ("enable_calibrator", "enable_encoder_calibrator"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))

    def strify(self) -> str:
        return f"T{int(self.enable_calibrator)}O{self.taylorseer_order}"


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
    tag = cache_config.strify()
    if calibrator_config is not None and calibrator_config.enable_calibrator:
        tag += "_" + calibrator_config.strify()
    return tag


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


def validated(config):
    """``config`` checked again where it is used: config objects are mutable dataclasses, and a field
    set after construction (``cfg.residual_diff_threshold = float("nan")``) skipped the check."""
    if config is not None:
        config.__post_init__()
    return config
