"""cache-dit's ``CacheStats``: what ``summary()`` returns per cached chain."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheStats:
    """cache-dit's per-chain statistics of the last request, with its field names (``cached_steps``: the
    cached step indices; ``residual_diffs``: step -> recorded diff, keys as strings; ``cfg_*``: the
    second CFG branch; DBPrune's ``pruned_*`` / ``actual_blocks``), plus cachedit-fx's own: which chain, its pattern and Fn/Bn, the gate that
    settled each step, and for a graph compiled uncached the reason (``unmatched``)."""

    cache_options: dict = field(default_factory=dict)
    cached_steps: list[int] = field(default_factory=list)
    residual_diffs: dict[str, float] = field(default_factory=dict)
    cfg_cached_steps: list[int] = field(default_factory=list)
    cfg_residual_diffs: dict[str, float] = field(default_factory=dict)
    accumulated_cached_steps: int = 0
    cfg_accumulated_cached_steps: int = 0
    accumulated_executed_steps: int = 0
    accumulated_transformer_executed_steps: int = 0
    # DBPrune (cache-dit's names): the steps in which a block was pruned, blocks pruned per call, blocks
    # per call, and sum(pruned_blocks) / sum(actual_blocks) (None before any call); residual_diffs then map
    # a step to the list of diffs its blocks recorded.
    pruned_steps: list[int] = field(default_factory=list)
    pruned_blocks: list[int] = field(default_factory=list)
    actual_blocks: list[int] = field(default_factory=list)
    pruned_ratio: float | None = None
    cfg_pruned_steps: list[int] = field(default_factory=list)
    cfg_pruned_blocks: list[int] = field(default_factory=list)
    cfg_actual_blocks: list[int] = field(default_factory=list)
    cfg_pruned_ratio: float | None = None
    transformer: str = ""
    chain: str | None = None
    pattern: str | None = None
    n_blocks: int = 0
    Fn: int = 0
    Bn: int = 0
    gates: list[str] = field(default_factory=list)
    cfg_gates: list[str] = field(default_factory=list)
    unmatched: str | None = None
    # MagCacheConfig(calibrate=True): the per-step residual magnitude ratios diffusers prints, to pass as
    # MagCacheConfig(mag_ratios=...); empty otherwise
    mag_ratios: list[float] = field(default_factory=list)
    cfg_mag_ratios: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.gates)

    @property
    def cfg_steps(self) -> int:
        return len(self.cfg_gates)
