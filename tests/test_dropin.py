"""cache-dit 1.5.3's API objects, compared with cache-dit itself where it is installed: config fields and
tags, steps_mask presets, ForwardPattern, and a cache-dit user's script run with ``import cachedit_fx as
cache_dit`` (summary's CacheStats, refresh_context, BlockAdapter, disable_cache). Tiny hand-written DiT,
eager inner compiler."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import cachedit_fx
import cachedit_fx as cache_dit  # what a cache-dit user writes
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

from tinydit import euler, latent, tiny

reference = pytest.importorskip("cache_dit", reason="cache-dit 1.5.3 (pip install --no-deps cache-dit==1.5.3)")

def denoise(model, steps):
    return euler(model, latent(), steps)


def same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


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


@pytest.mark.parametrize("bad, field", [(dict(cache_type="DBPrune"), "cache_type"),
                                        (dict(force_refresh_step_policy="twice"), "force_refresh_step_policy"),
                                        (dict(num_inference_steps=0), "num_inference_steps")])
def test_unsupported_or_bad_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        cache_dit.DBCacheConfig(**bad)


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


def test_a_cache_dit_script_runs_unchanged():
    """enable_cache with a BlockAdapter, summary's CacheStats, refresh_context (numbers: no recompile;
    structure: a recompile), disable_cache."""
    model = tiny()
    ref = denoise(model, 8)
    adapter = cache_dit.BlockAdapter(transformer=model, blocks=model.transformer_blocks,
                                     forward_pattern=cache_dit.ForwardPattern.Pattern_3)
    cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=2), compile=False)
    try:
        denoise(model, 8)
        stats = cache_dit.summary(model, logging=False)
        assert cache_dit.strify(stats) == cache_dit.strify(model) == \
            f"DBCache_F1B0_W2I1M0MC0_R0.9_CFG0_T0O0_S{len(stats[0].cached_steps)}"
        assert isinstance(stats[0], cache_dit.CacheStats) and stats[0].chain == "transformer_blocks[4]"
        assert stats[0].cached_steps and all(isinstance(s, int) and s >= 2 for s in stats[0].cached_steps)
        assert set(stats[0].residual_diffs) >= {str(s) for s in stats[0].cached_steps}
        assert stats[0].accumulated_cached_steps == len(stats[0].cached_steps)
        assert stats[0].cache_options["cache_config"].Fn_compute_blocks == 1
        graph = cache_hook(model).handle.graphs[0]

        cache_dit.refresh_context(model, residual_diff_threshold=0.0)  # a number: the same graph
        denoise(model, 8)
        assert cache_hook(model).handle.graphs[0] is graph
        assert cache_dit.summary(model, logging=False)[0].cached_steps == []

        mask = cache_dit.steps_mask(total_steps=8, mask_policy="fast")
        cache_dit.refresh_context(model, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=2, residual_diff_threshold=0.9, max_warmup_steps=2, steps_computation_mask=mask,
            steps_computation_policy="static"))  # structure: recompiles
        assert cache_hook(model).mode is Mode.NOT_COMPILED
        denoise(model, 8)
        stats = cache_dit.summary(model, logging=False)
        assert stats[0].Fn == 2 and stats[0].cached_steps == [i for i, bit in enumerate(mask) if bit == 0]
    finally:
        cache_dit.disable_cache(adapter)
    assert cache_hook(model) is None and same(denoise(model, 8), ref)


def test_a_pin_that_contradicts_the_graph_is_a_clear_error():
    model = tiny()
    wrong = cache_dit.BlockAdapter(transformer=model, blocks=model.transformer_blocks,
                                   forward_pattern=cache_dit.ForwardPattern.Pattern_1)
    cache_dit.enable_cache(wrong, cache_config=dict(Fn_compute_blocks=1), compile=False)
    try:
        with pytest.raises(cache_dit.ConfigError, match=r"Pattern_1 for transformer_blocks returns "
                                                        r"\('encoder_hidden_states', 'hidden_states'\).*Pattern_3"):
            denoise(model, 1)
    finally:
        cache_dit.disable_cache(wrong)
    with pytest.raises(cache_dit.ConfigError, match="blocks_name: TinyDiT has no ModuleList 'layers'"):
        cache_dit.enable_cache(cache_dit.BlockAdapter(transformer=model, blocks_name=["layers"]), compile=False)


def test_refresh_of_a_bare_backend_compile_refuses_structural_changes():
    model = tiny()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="cachedit", fullgraph=True, dynamic=False,
                             options=dict(cache_config=dict(Fn_compute_blocks=1, residual_diff_threshold=0.9,
                                                            max_warmup_steps=2), inner="eager"))
    denoise(compiled, 4)
    cache_dit.refresh_context(model, max_warmup_steps=3)  # a number: fine
    with pytest.raises(cache_dit.ConfigError, match="Fn_compute_blocks are compiled into"):
        cache_dit.refresh_context(model, Fn_compute_blocks=2)
    torch._dynamo.reset()
