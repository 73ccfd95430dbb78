"""diffusers 0.42's cache indicators as cache configs: ``FirstBlockCacheConfig`` and ``MagCacheConfig``,
with diffusers' names, fields and defaults. Each is a :class:`DBCacheConfig` (so everything that takes a
cache config takes it, and its numbers load without a recompile) whose class says *when* to cache;
any calibrator says *how*. diffusers' own config objects are accepted too (:func:`coerce_cache`).

- ``FirstBlockCacheConfig(threshold)``: DBCache's diff of the first block's residual against the last
  computed step, cached while ``diff <= threshold`` (diffusers' comparison: NaN caches), no warmup.
- ``MagCacheConfig(threshold, max_skip_steps, retention_ratio, num_inference_steps, mag_ratios,
  calibrate)``: cached while the error accumulated from the calibrated residual-magnitude ratios stays
  within ``threshold``; it skips every block (``Fn_compute_blocks=0``). ``calibrate=True`` computes
  every step and records the ratios (``summary()``'s ``mag_ratios``).

``threshold`` is ``residual_diff_threshold`` under diffusers' name, so ``refresh_context`` and ``tune``
set either."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from .cache import DBCacheConfig
from .fields import check_bool, check_float, check_int, coerce, fail, structural

INDICATORS = ("dbcache", "first_block", "magcache")


def _with_threshold(defaults: dict, threshold: float | None, fields: dict) -> dict:
    if threshold is not None:
        if "residual_diff_threshold" in fields and fields["residual_diff_threshold"] != threshold:
            fail("threshold", "the same as residual_diff_threshold when both are given (one is the other's name)",
                 threshold)
        fields["residual_diff_threshold"] = threshold
    return {**defaults, **fields}


@dataclass(init=False)
class FirstBlockCacheConfig(DBCacheConfig):
    """diffusers' FirstBlockCache: compute the first block, cache the rest while its residual's relative
    L1 diff against the last computed step is at most ``threshold``. The DBCache fields keep their
    meaning (Fn / Bn, CFG, limits); the defaults are diffusers' (F1B0, no warmup)."""

    INDICATOR: ClassVar[str] = "first_block"

    def __init__(self, threshold: float | None = None, **fields: Any):
        DBCacheConfig.__init__(self, **_with_threshold(
            dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=0, residual_diff_threshold=0.05),
            threshold, fields))

    @property
    def threshold(self) -> float:
        return self.residual_diff_threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.residual_diff_threshold = value

    def strify(self) -> str:
        return "FBC_" + DBCacheConfig.strify(self).split("_", 1)[1]


@dataclass(init=False)
class MagCacheConfig(DBCacheConfig):
    """diffusers' MagCache: from step ``int(retention_ratio * num_inference_steps + 0.5)`` on, multiply
    the step's calibrated magnitude ratio into an accumulated ratio and add ``|1 - ratio|`` to an
    accumulated error; skip every block while the error is at most ``threshold`` and at most
    ``max_skip_steps`` steps were skipped in a row (docs/algorithm.md). ``mag_ratios`` (one per step of
    the calibration run, resampled to ``num_inference_steps`` as diffusers does) is required unless
    ``calibrate``."""

    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: Sequence[float] | None = None
    calibrate: bool = structural(False)
    INDICATOR: ClassVar[str] = "magcache"
    MIN_FN: ClassVar[int] = 0

    def __init__(self, threshold: float | None = None, max_skip_steps: int = 3, retention_ratio: float = 0.2,
                 num_inference_steps: int | None = 28, mag_ratios: Sequence[float] | None = None,
                 calibrate: bool = False, **fields: Any):
        self.max_skip_steps, self.retention_ratio, self.calibrate = max_skip_steps, retention_ratio, calibrate
        self.mag_ratios = mag_ratios
        DBCacheConfig.__init__(self, **_with_threshold(
            dict(Fn_compute_blocks=0, Bn_compute_blocks=0, max_warmup_steps=0, residual_diff_threshold=0.06,
                 num_inference_steps=num_inference_steps), threshold, fields))

    threshold = FirstBlockCacheConfig.threshold

    def __post_init__(self) -> None:
        DBCacheConfig.__post_init__(self)
        check_int("max_skip_steps", self.max_skip_steps, 0)
        check_float("retention_ratio", self.retention_ratio)
        check_bool("calibrate", self.calibrate)
        if self.num_inference_steps is None:
            fail("num_inference_steps", "an int >= 1 (MagCache resamples its ratios to it)", None)
        if self.mag_ratios is None:
            if not self.calibrate:
                fail("mag_ratios", "the ratios of a calibration run (MagCacheConfig(calibrate=True) records them; "
                     "summary()'s mag_ratios) unless calibrate=True", None)
            return
        ratios = self.mag_ratios.tolist() if isinstance(self.mag_ratios, torch.Tensor) else self.mag_ratios
        if not isinstance(ratios, (list, tuple)) or not ratios or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in ratios):
            fail("mag_ratios", "a non-empty list of finite numbers", self.mag_ratios)
        # diffusers keeps them as a float32 tensor: the same values here
        self.mag_ratios = torch.tensor(ratios, dtype=torch.float32).tolist()

    def resampled_ratios(self, steps: int) -> list[float]:
        """The ratios for ``steps`` steps: diffusers' ``nearest_interp`` (round half to even of
        ``arange(steps) * (len - 1) / (steps - 1)`` in float32)."""
        src = torch.tensor(self.mag_ratios or [1.0], dtype=torch.float32)
        if steps == 1:
            return src[-1:].tolist()
        if len(src) == steps:
            return src.tolist()
        grid = torch.arange(steps, dtype=torch.float32) * ((len(src) - 1) / (steps - 1))
        return src[torch.round(grid).long()].tolist()

    def strify(self) -> str:
        tag = (f"MagCache_F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}_R{self.residual_diff_threshold}"
               f"_K{self.max_skip_steps}_r{self.retention_ratio}_N{self.num_inference_steps}")
        return tag + ("_calibrate" if self.calibrate else "")


def indicator_of(cache_config: DBCacheConfig) -> str:
    """Which rule decides when a step is cached: "dbcache", "first_block" or "magcache"."""
    return getattr(type(cache_config), "INDICATOR", "dbcache")


def from_diffusers(value: Any) -> Any:
    """diffusers' own ``FirstBlockCacheConfig`` / ``MagCacheConfig`` as ours (their fields, same meaning);
    anything else unchanged."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC, MagCacheConfig as DiffusersMag

    if isinstance(value, DiffusersFBC):
        return FirstBlockCacheConfig(threshold=value.threshold)
    if isinstance(value, DiffusersMag):
        return MagCacheConfig(threshold=value.threshold, max_skip_steps=value.max_skip_steps,
                              retention_ratio=value.retention_ratio, num_inference_steps=value.num_inference_steps,
                              mag_ratios=value.mag_ratios, calibrate=value.calibrate)
    return value


CACHE_CLASSES = {cls.__name__: cls for cls in (DBCacheConfig, FirstBlockCacheConfig, MagCacheConfig)}


def coerce_cache(value: Any, field: str = "cache_config") -> DBCacheConfig | None:
    """A cache config (DBCache, FirstBlockCache, MagCache, or diffusers' FirstBlockCacheConfig /
    MagCacheConfig), a dict of DBCacheConfig's fields, or None."""
    return coerce(from_diffusers(value), DBCacheConfig, field)
