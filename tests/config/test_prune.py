"""DBPruneConfig: its validation (a bad value names its field), which blocks it prunes, and how it merges
with DBCacheConfig (refresh_context, ParamsModifier, dicts of fields)."""
from __future__ import annotations

import pytest

import cachedit_fx
from cachedit_fx.config import (CacheType, DBCacheConfig, DBPruneConfig, TaylorSeerCalibratorConfig, coerce, merged,
                                pass_settings, structural_changes)
from cachedit_fx.errors import ConfigError


@pytest.mark.parametrize("kwargs, field", [
    (dict(non_prune_block_ids=[-1]), "non_prune_block_ids"),
    (dict(non_prune_block_ids="1,2"), "non_prune_block_ids"),
    (dict(non_prune_block_ids=[True]), "non_prune_block_ids"),
    (dict(enable_dynamic_prune_threshold=1), "enable_dynamic_prune_threshold"),
    (dict(max_dynamic_prune_threshold=float("inf")), "max_dynamic_prune_threshold"),
    (dict(dynamic_prune_threshold_relax_ratio="1.25"), "dynamic_prune_threshold_relax_ratio"),
    (dict(force_reduce_calibrator_vram=None), "force_reduce_calibrator_vram"),
    (dict(per_sample=True), "per_sample"),
    (dict(enable_separate_cfg=True, cfg_diff_compute_separate=False), "cfg_diff_compute_separate"),
    (dict(cache_type=CacheType.DBCache), "cache_type"),
    (dict(Fn_compute_blocks=0), "Fn_compute_blocks"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DBPruneConfig(**kwargs)


def test_the_prune_type_belongs_to_its_config():
    with pytest.raises(ConfigError, match="DBPruneConfig"):
        DBCacheConfig(cache_type="DBPrune")
    assert DBPruneConfig().cache_type is CacheType.DBPrune is cachedit_fx.DBPrune
    assert DBPruneConfig(cache_type="NONE").cache_type is CacheType.NONE
    # separate CFG with a shared diff is refused only where cache-dit fails (the non-CFG call first)
    DBPruneConfig(enable_separate_cfg=True, cfg_diff_compute_separate=False, cfg_compute_first=True)
    with pytest.raises(ConfigError, match="calibrator_config"):
        pass_settings(DBPruneConfig(), TaylorSeerCalibratorConfig())


def test_prunable_blocks():
    assert DBPruneConfig(Fn_compute_blocks=1, Bn_compute_blocks=0).prunable(8) == [1, 2, 3, 4, 5, 6, 7]
    assert DBPruneConfig(Fn_compute_blocks=2, Bn_compute_blocks=1, non_prune_block_ids=[5, 3, 3, 40]).prunable(8) \
        == [2, 4, 6]
    assert DBPruneConfig().prunable(8) == []  # the default Fn=8 prunes nothing in a chain of 8, as in cache-dit
    assert DBPruneConfig(Fn_compute_blocks=12, Bn_compute_blocks=3).prunable(8) == []


def test_merges_and_dicts():
    prune = DBPruneConfig(Fn_compute_blocks=1, non_prune_block_ids=[2], residual_diff_threshold=0.2)
    over_cache = merged(DBCacheConfig(max_warmup_steps=3), prune)  # a full config replaces the class
    assert isinstance(over_cache, DBPruneConfig) and over_cache.non_prune_block_ids == [2]
    assert isinstance(merged(prune, DBCacheConfig()), DBCacheConfig)
    partial = merged(prune, DBPruneConfig().reset(enable_dynamic_prune_threshold=True, residual_diff_threshold=0.3))
    assert (partial.enable_dynamic_prune_threshold, partial.residual_diff_threshold, partial.non_prune_block_ids) == \
        (True, 0.3, [2])
    with pytest.raises(ConfigError, match="non_prune_block_ids"):
        merged(DBCacheConfig(), DBPruneConfig().reset(non_prune_block_ids=[1]))
    assert structural_changes(prune, DBPruneConfig(Fn_compute_blocks=1, non_prune_block_ids=[3])) == \
        ["non_prune_block_ids"]
    assert structural_changes(prune, DBPruneConfig(Fn_compute_blocks=1, non_prune_block_ids=[2],
                                                   enable_dynamic_prune_threshold=True)) == []  # a number
    assert "cache_type" in structural_changes(DBCacheConfig(Fn_compute_blocks=1), prune)
    from_dict = coerce({"cache_type": "DBPrune", "non_prune_block_ids": [4]}, DBCacheConfig, "cache_config")
    assert isinstance(from_dict, DBPruneConfig) and from_dict.non_prune_block_ids == [4]
    with pytest.raises(ConfigError, match="non_prune_block_ids"):
        coerce({"non_prune_block_ids": [4]}, DBCacheConfig, "cache_config")  # a DBCache dict
