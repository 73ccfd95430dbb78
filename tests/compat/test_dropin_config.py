"""cache-dit 1.5.3's API objects, compared with cache-dit itself where it is installed: config fields and
tags, bad values named by field, partial configs, steps_mask presets and ForwardPattern."""
from __future__ import annotations

import dataclasses
import random

import pytest

import cachedit_fx
import cachedit_fx as cache_dit  # what a cache-dit user writes

reference = pytest.importorskip("cache_dit", reason="cache-dit 1.5.3 (pip install --no-deps cache-dit==1.5.3)")


def test_config_fields_and_tags_are_cache_dits():
    ours = {f.name for f in dataclasses.fields(cache_dit.DBCacheConfig)}
    assert {f.name for f in dataclasses.fields(reference.DBCacheConfig)} <= ours
    assert {f.name for f in dataclasses.fields(reference.TaylorSeerCalibratorConfig)} == \
        {f.name for f in dataclasses.fields(cache_dit.TaylorSeerCalibratorConfig)}
    fields = dict(Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.12, max_warmup_steps=3,
                  warmup_interval=2, max_cached_steps=5, max_continuous_cached_steps=2, num_inference_steps=9,
                  steps_computation_mask=[1, 1, 0, 1, 0, 0, 1, 0, 1], force_refresh_step_hint=4,
                  force_refresh_step_policy="repeat", enable_separate_cfg=True)
    for kw in ({}, fields):
        assert cache_dit.DBCacheConfig(**kw).strify() == reference.DBCacheConfig(**kw).strify()
    calib = dict(taylorseer_order=2, calibrator_cache_type="hidden_states")
    assert cache_dit.TaylorSeerCalibratorConfig(**calib).strify() == reference.TaylorSeerCalibratorConfig(**calib).strify()
    assert str(cache_dit.DBCache) == str(reference.DBCache) and cache_dit.DBCacheConfig(cache_type="NONE").cache_type \
        is cache_dit.NONE


def test_prune_config_fields_defaults_and_tags_are_cache_dits():
    theirs, ours = reference.DBPruneConfig(), cache_dit.DBPruneConfig()
    for f in dataclasses.fields(reference.DBPruneConfig):
        assert str(getattr(ours, f.name)) == str(getattr(theirs, f.name)), f.name
    fields = dict(Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.12, max_warmup_steps=3,
                  warmup_interval=2, max_cached_steps=5, max_continuous_cached_steps=2, non_prune_block_ids=[4],
                  enable_dynamic_prune_threshold=True)
    for kw in ({}, fields):
        assert cache_dit.DBPruneConfig(**kw).strify() == reference.DBPruneConfig(**kw).strify()
    assert str(cache_dit.DBPrune) == str(reference.DBPrune)


@pytest.mark.parametrize("bad, field", [(dict(cache_type="DBPrune"), "cache_type"),
                                        (dict(force_refresh_step_policy="twice"), "force_refresh_step_policy"),
                                        (dict(num_inference_steps=0), "num_inference_steps")])
def test_unsupported_or_bad_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        cache_dit.DBCacheConfig(**bad)


@pytest.mark.parametrize("name, fields", [
    ("FoCaCalibratorConfig", dict(enable_encoder_calibrator=False, calibrator_cache_type="hidden_states")),
    ("DMDCalibratorConfig", dict(dmd_history=4, dmd_rank=2, dmd_ridge=1e-6, dmd_svd_precision="low",
                                 calibrator_kwargs={"n_derivatives": 2})),
])
def test_foca_and_dmd_configs_are_cache_dits(name, fields):
    """cache-dit 1.5.3's FoCa / DMD configs: the same fields, defaults and tags (a script that builds them
    runs unchanged)."""
    theirs, ours = getattr(reference, name), getattr(cache_dit, name)
    assert [f.name for f in dataclasses.fields(theirs)] == [f.name for f in dataclasses.fields(ours)]
    for kw in ({}, fields):
        t, o = theirs(**kw), ours(**kw)
        assert {f.name: getattr(o, f.name) for f in dataclasses.fields(o)} == \
            {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
        assert o.strify() == t.strify()


@pytest.mark.parametrize("bad, field", [(dict(dmd_history=0), "dmd_history"), (dict(dmd_rank=-1), "dmd_rank"),
                                        (dict(dmd_ridge=float("nan")), "dmd_ridge"),
                                        (dict(dmd_svd_precision="best"), "dmd_svd_precision"),
                                        (dict(calibrator_type="foca"), "calibrator_type")])
def test_bad_dmd_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        cache_dit.DMDCalibratorConfig(**bad)


def test_calibrator_values_we_do_not_run_are_refused_by_name():
    with pytest.raises(ValueError, match="calibrator_type"):
        cache_dit.TaylorSeerCalibratorConfig(calibrator_type="foca")
    with pytest.raises(ValueError, match="calibrator_kwargs"):
        cache_dit.TaylorSeerCalibratorConfig(calibrator_kwargs={"max_warmup_steps": 2})


def test_update_is_in_place_and_partial_configs_override_only_their_fields():
    cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=2)
    assert cfg.update(residual_diff_threshold=0.2, max_warmup_steps=None) is cfg
    assert (cfg.residual_diff_threshold, cfg.max_warmup_steps) == (0.2, 8)
    with pytest.raises(ValueError, match="unknown field"):
        cfg.update(threshold=0.3)
    modifier = cache_dit.ParamsModifier(cache_config=cache_dit.DBCacheConfig().reset(max_warmup_steps=4))
    merged = cachedit_fx.config.merged(cfg, modifier.cache_config)
    assert (merged.Fn_compute_blocks, merged.max_warmup_steps, merged.residual_diff_threshold) == (2, 4, 0.2)


def test_steps_mask_equals_cache_dits_for_every_preset_and_step_count():
    for steps in (4, 6, *range(8, 121)):
        for policy in ("slow", "medium", "fast", "ultra"):
            assert cache_dit.steps_mask(total_steps=steps, mask_policy=policy) == \
                reference.steps_mask(total_steps=steps, mask_policy=policy), (steps, policy)
    rng = random.Random(0)
    for _ in range(200):
        compute = [rng.randint(1, 5) for _ in range(rng.randint(1, 5))]
        cache = [rng.randint(1, 5) for _ in range(rng.randint(1, 5))]
        total = rng.choice([None, sum(compute) + sum(cache), max(1, sum(compute) + sum(cache) - rng.randint(0, 4))])
        assert cache_dit.steps_mask(compute, cache, total) == reference.steps_mask(compute, cache, total)
    with pytest.raises(ValueError, match="total_steps must be 4, 6 or >= 8"):
        cache_dit.steps_mask(total_steps=5)
    with pytest.raises(ValueError, match="mask_policy must be one of"):
        cache_dit.steps_mask(total_steps=28, mask_policy="warp")


def test_forward_patterns_have_cache_dits_attributes():
    for theirs in reference.ForwardPattern:
        ours = getattr(cache_dit.ForwardPattern, theirs.name)
        assert (ours.Return_H_First, ours.Return_H_Only, ours.Forward_H_only, ours.In, ours.Out, ours.Supported) == \
            (theirs.Return_H_First, theirs.Return_H_Only, theirs.Forward_H_only, theirs.In, theirs.Out, theirs.Supported)
    assert cache_dit.Pattern_3 is cache_dit.ForwardPattern.Pattern_3 and int(cache_dit.Pattern_3) == 3
