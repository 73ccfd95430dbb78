"""cache-dit's cache types and ``DBCacheConfig`` (alias ``BasicCacheConfig``), its fields,
validation and compact tag."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from .fields import (ConfigBase, check_bool, check_choice, check_float, check_int, fail,
                     structural)

STEPS_POLICIES = ("dynamic", "static")
REFRESH_POLICIES = ("once", "repeat")


class CacheType(enum.Enum):
    """cache-dit's cache types: DBCache (``DBCacheConfig``), DBPrune (``DBPruneConfig``); NONE leaves the
    model uncached."""

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
        fail(field, "CacheType.DBCache, CacheType.DBPrune or CacheType.NONE ('DBCache' / 'DBPrune' / 'NONE')", value)


@dataclass
class DBCacheConfig(ConfigBase):
    """DBCache: run the first ``Fn_compute_blocks`` and last ``Bn_compute_blocks`` blocks every step,
    reuse the middle blocks' residual while the Fn residual changes less than ``residual_diff_threshold``.
    Every field is cache-dit's; docs/algorithm.md says what each does. ``per_sample`` is ours."""

    cache_type: CacheType | str = structural(CacheType.DBCache)
    Fn_compute_blocks: int = structural(8)
    Bn_compute_blocks: int = structural(0)
    residual_diff_threshold: float = 0.08
    max_accumulated_residual_diff_threshold: float | None = None
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    enable_separate_cfg: bool | None = structural(None)
    cfg_compute_first: bool = structural(False)
    cfg_diff_compute_separate: bool = structural(True)
    num_inference_steps: int | None = None
    steps_computation_mask: Sequence[int] | None = None
    steps_computation_policy: str = "dynamic"
    force_refresh_step_hint: int | None = None
    force_refresh_step_policy: str = "once"
    per_sample: bool = structural(False)
    # The fewest Fn blocks the config allows: MagCache (config/indicators.py) skips the first block too.
    MIN_FN: ClassVar[int] = 1

    # The cache types this config class runs (a DBPrune config is a DBPruneConfig, config/prune.py).
    CACHE_TYPES: ClassVar[tuple[CacheType, ...]] = (CacheType.DBCache, CacheType.NONE)

    @classmethod
    def from_fields(cls, fields: dict) -> "DBCacheConfig":
        """A config of the class (this one or a subclass) that runs ``fields["cache_type"]``: a dict with
        ``cache_type="DBPrune"`` makes a ``DBPruneConfig``."""
        kind = CacheType.parse(fields.get("cache_type", cls.cache_type))
        for klass in (cls, *cls.__subclasses__()):
            if kind in klass.CACHE_TYPES:
                return klass(**fields)
        return cls(**fields)  # __post_init__ names the allowed types

    def __post_init__(self) -> None:
        self.cache_type = CacheType.parse(self.cache_type)
        if self.cache_type not in self.CACHE_TYPES:
            allowed = " or ".join(f"CacheType.{t.value}" for t in self.CACHE_TYPES)
            hint = " (DBPrune: use DBPruneConfig)" if self.cache_type is CacheType.DBPrune else ""
            fail("cache_type", f"{allowed} for {type(self).__name__}{hint}", self.cache_type)
        check_int("Fn_compute_blocks", self.Fn_compute_blocks, self.MIN_FN)
        check_int("Bn_compute_blocks", self.Bn_compute_blocks, 0)
        check_float("residual_diff_threshold", self.residual_diff_threshold)
        check_int("max_warmup_steps", self.max_warmup_steps, 0)
        check_int("warmup_interval", self.warmup_interval, 1)
        check_int("max_cached_steps", self.max_cached_steps, -1)
        check_int("max_continuous_cached_steps", self.max_continuous_cached_steps, -1)
        if self.max_accumulated_residual_diff_threshold is not None:
            check_float("max_accumulated_residual_diff_threshold", self.max_accumulated_residual_diff_threshold)
        if self.enable_separate_cfg not in (None, True, False):
            fail("enable_separate_cfg", "None (detect), True or False", self.enable_separate_cfg)
        for name in ("cfg_compute_first", "cfg_diff_compute_separate", "per_sample"):
            check_bool(name, getattr(self, name))
        if self.num_inference_steps is not None:
            check_int("num_inference_steps", self.num_inference_steps, 1)
        check_choice("steps_computation_policy", self.steps_computation_policy, STEPS_POLICIES)
        if self.force_refresh_step_hint is not None:
            check_int("force_refresh_step_hint", self.force_refresh_step_hint, 1)
        check_choice("force_refresh_step_policy", self.force_refresh_step_policy, REFRESH_POLICIES)
        if self.steps_computation_mask is not None:
            if not isinstance(self.steps_computation_mask, (list, tuple, range)):
                fail("steps_computation_mask", "a list of 0 and 1 (steps_mask(...) builds one)",
                      self.steps_computation_mask)
            mask = list(self.steps_computation_mask)
            if not mask or any(isinstance(v, bool) or v not in (0, 1) or isinstance(v, float) and v != int(v)
                               for v in mask):
                fail("steps_computation_mask", "a non-empty sequence of 0 and 1", self.steps_computation_mask)
            if self.steps_computation_policy == "static" and self.max_warmup_steps == 0 and mask[0] == 0:
                fail("steps_computation_mask", "1 at step 0 with policy 'static' and no warmup "
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


