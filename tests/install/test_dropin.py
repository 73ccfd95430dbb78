"""A cache-dit user's script run with ``import cachedit_fx as cache_dit`` (summary's CacheStats,
refresh_context, BlockAdapter, disable_cache), a BlockAdapter pin that contradicts the graph, and
refresh_context of a bare backend compile. Tiny hand-written DiT, eager inner compiler."""
from __future__ import annotations

import pytest
import torch

import cachedit_fx as cache_dit  # what a cache-dit user writes
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

from tests.helpers.dynamo import compile_own
from tests.helpers.tinydit import euler, latent, tiny

reference = pytest.importorskip("cache_dit", reason="cache-dit 1.5.3 (pip install --no-deps cache-dit==1.5.3)")


def denoise(model, steps):
    return euler(model, latent(), steps)


def same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


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


def test_a_cache_dit_script_with_foca_then_dmd_runs_unchanged():
    """cache-dit 1.5.3's new calibrators in a script: FoCa, then refresh_context to DMD (the calibrator is
    structure: a recompile), each with the same cached steps as cache-dit runs for the same script."""
    torch.manual_seed(0)
    model = tiny()
    theirs_model = tiny()
    theirs_model.load_state_dict(model.state_dict())
    cache = dict(Fn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=4)
    steps = []
    for lib, m, extra in ((reference, theirs_model, {}), (cache_dit, model, dict(compile=False))):
        adapter = lib.BlockAdapter(transformer=m, blocks=m.transformer_blocks,
                                   forward_pattern=lib.ForwardPattern.Pattern_3)
        lib.enable_cache(adapter, cache_config=lib.DBCacheConfig(**cache),
                         calibrator_config=lib.FoCaCalibratorConfig(), **extra)
        runs = []
        for calibrator in (None, lib.DMDCalibratorConfig(dmd_history=4)):
            if calibrator is not None:
                lib.refresh_context(m, cache_config=lib.DBCacheConfig(**cache), calibrator_config=calibrator)
            out = denoise(m, 8)
            ctx = (m._context_manager.get_context(m._context_names[-1]) if lib is reference
                   else lib.summary(m, logging=False)[0])
            runs.append((list(ctx.cached_steps), out))
        steps.append(runs)
    (theirs_foca, theirs_dmd), (ours_foca, ours_dmd) = steps
    assert ours_foca[0] == theirs_foca[0] and ours_dmd[0] == theirs_dmd[0] and ours_foca[0], steps
    for (_, mine), (_, their) in ((ours_foca, theirs_foca), (ours_dmd, theirs_dmd)):
        for a, b in zip(mine, their):
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    assert cache_dit.strify(model).startswith("DBCache_F1B0_W4") and "DMDH4" in cache_dit.strify(model)


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
    compiled = compile_own(model, backend="cachedit", fullgraph=True, dynamic=False,
                           options=dict(cache_config=dict(Fn_compute_blocks=1, residual_diff_threshold=0.9,
                                                          max_warmup_steps=2), inner="eager"))
    denoise(compiled, 4)
    cache_dit.refresh_context(model, max_warmup_steps=3)  # a number: fine
    with pytest.raises(cache_dit.ConfigError, match="Fn_compute_blocks are compiled into"):
        cache_dit.refresh_context(model, Fn_compute_blocks=2)
