"""cache-dit's ``DBPruneConfig``: Dynamic Block Prune, the per-block variant of DBCache. Every middle
block is skipped on its own when its own input changed less than the (optionally dynamic) prune
threshold since it last ran; docs/algorithm.md ("DBPrune") says exactly how."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .cache import CacheType, DBCacheConfig
from .fields import check_bool, check_float, fail, structural


@dataclass
class DBPruneConfig(DBCacheConfig):
    """DBPrune with cache-dit 1.5.3's fields and defaults. The inherited DBCache fields keep their
    meaning per block: blocks ``[0, Fn_compute_blocks)``, the last ``Bn_compute_blocks`` and
    ``non_prune_block_ids`` always run; ``residual_diff_threshold`` is the prune threshold; the warmup,
    the steps mask and ``max_cached_steps`` / ``max_continuous_cached_steps`` count *pruned steps* (steps
    in which at least one block was pruned). ``max_accumulated_residual_diff_threshold`` has no effect
    (cache-dit's DBPrune never accumulates diffs)."""

    cache_type: CacheType | str = structural(CacheType.DBPrune)
    enable_dynamic_prune_threshold: bool = False
    max_dynamic_prune_threshold: float | None = None
    dynamic_prune_threshold_relax_ratio: float = 1.25
    non_prune_block_ids: list[int] = structural(default_factory=list)
    force_reduce_calibrator_vram: bool = False

    CACHE_TYPES: ClassVar[tuple[CacheType, ...]] = (CacheType.DBPrune, CacheType.NONE)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("enable_dynamic_prune_threshold", self.enable_dynamic_prune_threshold)
        check_bool("force_reduce_calibrator_vram", self.force_reduce_calibrator_vram)
        check_float("dynamic_prune_threshold_relax_ratio", self.dynamic_prune_threshold_relax_ratio)
        if self.max_dynamic_prune_threshold is not None:
            check_float("max_dynamic_prune_threshold", self.max_dynamic_prune_threshold)
        ids = self.non_prune_block_ids
        if not isinstance(ids, (list, tuple, range)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                          for i in ids):
            fail("non_prune_block_ids", "a list of block indices (ints >= 0)", ids)
        self.non_prune_block_ids = sorted(set(ids))
        if self.per_sample:
            fail("per_sample", "False for DBPrune (cache-dit prunes per call, not per sample)", self.per_sample)
        if self.enable_separate_cfg is True and not self.cfg_diff_compute_separate and not self.cfg_compute_first:
            # cache-dit 1.5.3 raises a TypeError at the first CFG call there (a list compared with a float).
            fail("cfg_diff_compute_separate", "True for DBPrune with enable_separate_cfg=True and cfg_compute_first="
                 "False (each block's diff is its own; cache-dit 1.5.3 fails on this combination)",
                 self.cfg_diff_compute_separate)

    def prunable(self, n_blocks: int) -> list[int]:
        """The indices of the blocks of a chain of ``n_blocks`` that may be pruned: all but the first
        ``Fn_compute_blocks``, the last ``Bn_compute_blocks`` and ``non_prune_block_ids`` (cache-dit's
        ``get_non_prune_blocks_ids``; Fn / Bn beyond the chain leave nothing to prune)."""
        fixed = set(range(min(self.Fn_compute_blocks, n_blocks)))
        fixed |= set(range(n_blocks - min(self.Bn_compute_blocks, n_blocks), n_blocks))
        fixed |= set(self.non_prune_block_ids)
        return [j for j in range(n_blocks) if j not in fixed]

    def strify(self) -> str:
        """cache-dit's DBPrune tag, e.g. ``DBPrune_F8B0_W8I1M0MC0_R0.08``."""
        return (f"{self.cache_type}_F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}"
                f"_W{self.max_warmup_steps}I{self.warmup_interval}"
                f"M{max(0, self.max_cached_steps)}MC{max(0, self.max_continuous_cached_steps)}"
                f"_R{self.residual_diff_threshold}")


def is_prune(config) -> bool:
    """Whether a cache config prunes blocks (a ``DBPruneConfig`` whose ``cache_type`` is DBPrune)."""
    return isinstance(config, DBPruneConfig) and config.cache_type is CacheType.DBPrune


PRUNE_FIELDS = tuple(f.name for f in dataclasses.fields(DBPruneConfig)
                     if f.name not in {g.name for g in dataclasses.fields(DBCacheConfig)})
