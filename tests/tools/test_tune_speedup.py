"""tune's speedup in blocks run, from summary()'s stats: DBCache skips the middle of a cached call, DBPrune
only the blocks it pruned (a call that pruned one block saves one block, not the middle)."""
from __future__ import annotations

from cachedit_fx import CacheStats
from cachedit_fx.tools.tune import blocks_speedup


def test_dbcache_cached_calls_skip_the_middle():
    stats = CacheStats(cached_steps=[2, 3], gates=["warmup"] * 2 + ["diff_test"] * 2, n_blocks=8, Fn=1, Bn=0)
    assert blocks_speedup([stats]) == (2, 4, 32 / (32 - 2 * 7))


def test_dbprune_counts_the_pruned_blocks():
    # cache-dit's max_cached_steps=2 trace: step 2 pruned one block before the limit stopped it
    pruned = [0, 7, 1, 0, 0, 0, 0, 0]
    stats = CacheStats(cached_steps=[1, 2], pruned_steps=[1, 2], pruned_blocks=pruned, actual_blocks=[8] * 8,
                       gates=["-"] * 8, n_blocks=8, Fn=1, Bn=0)
    cfg = CacheStats(cached_steps=[1], cfg_cached_steps=[1], pruned_blocks=[0, 3], cfg_pruned_blocks=[0, 2],
                     gates=["-"] * 2, cfg_gates=["-"] * 2, n_blocks=8, Fn=1, Bn=0)
    assert blocks_speedup([stats]) == (2, 8, 64 / (64 - 8))
    assert blocks_speedup([stats, cfg]) == (4, 12, 96 / (96 - 8 - 5))
    assert blocks_speedup([CacheStats(unmatched="no chain")]) == (0, 0, 1.0)
