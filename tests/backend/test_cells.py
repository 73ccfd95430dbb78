"""The indicator x calibrator matrix: every cell (DBCache, FirstBlockCache, MagCache) x (none, TaylorSeer,
FoCa, DMD) compiles the tiny DiT (pattern 3, one block list: the eager cache's chain is the graph's;
on Flux the eager cache hooks only the double blocks) to one Dynamo graph with no break, serves two requests with another
threshold loaded between them (``handle.configure``) without a recompile or a second inner compile, and
decides and computes exactly what the eager cache (install/eager.py, the same pure state update outside
any graph) does."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import cachedit_fx
from cachedit_fx import zoo
from cachedit_fx.runtime.handle import CacheHandle
from cachedit_fx.runtime.stats import cache_stats

from tests.helpers.dynamo import compile_own

pytestmark = pytest.mark.slow

STEPS = 8
FAMILY = "dit"
# a calibration run's ratios for 8 steps (the tiny Flux's: near 1, drifting)
RATIOS = [1.0, 0.98349, 1.01407, 1.06314, 0.97574, 1.02616, 0.94123, 0.99016]
INDICATORS = {
    "dbcache": lambda t: cachedit_fx.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=t,
                                                   max_warmup_steps=2, num_inference_steps=STEPS),
    "first_block": lambda t: cachedit_fx.FirstBlockCacheConfig(threshold=t, num_inference_steps=STEPS),
    "magcache": lambda t: cachedit_fx.MagCacheConfig(threshold=t / 4, num_inference_steps=STEPS, mag_ratios=RATIOS,
                                                     retention_ratio=0.0),
}
CALIBRATORS = {
    "none": lambda: None,
    "taylorseer": lambda: cachedit_fx.TaylorSeerCalibratorConfig(taylorseer_order=1),
    "foca": lambda: cachedit_fx.FoCaCalibratorConfig(),
    "dmd": lambda: cachedit_fx.DMDCalibratorConfig(dmd_history=4),
}
THRESHOLDS = (0.5, 0.35)


@pytest.fixture(scope="module")
def flux():
    return zoo.build_transformer(FAMILY)


def _requests(run, set_threshold, read_cached):
    out = []
    for r, threshold in enumerate(THRESHOLDS):
        if r:
            set_threshold(threshold)
        outputs = zoo.denoise(None, FAMILY, inputs_of_run[0], num_steps=STEPS, call=run)[1]
        out.append((read_cached(), outputs))
    return out


inputs_of_run: list = []


@pytest.mark.parametrize("calibrator", CALIBRATORS)
@pytest.mark.parametrize("indicator", INDICATORS)
def test_cell_one_graph_same_as_eager(flux, indicator, calibrator):
    base, inputs = flux
    inputs_of_run[:] = [inputs]
    cache = INDICATORS[indicator](THRESHOLDS[0])
    calib = CALIBRATORS[calibrator]()

    eager_model = copy.deepcopy(base)
    cachedit_fx.enable_cache(eager_model, cache_config=cache, calibrator_config=calib, eager=True)

    def eager_cached():
        s, = [s for s in cachedit_fx.summary(eager_model, logging=False) if s.unmatched is None]
        return list(s.cached_steps)

    def eager_threshold(t):
        cachedit_fx.refresh_context(eager_model, cache_config=INDICATORS[indicator](t))

    theirs = _requests(eager_model, eager_threshold, eager_cached)

    counters.clear()
    inner_log = []

    def inner(gm, example_inputs):
        inner_log.append(gm)
        return gm.forward

    handle = CacheHandle(cache, calib)
    model = copy.deepcopy(base)
    compiled = compile_own(model, backend="cachedit", fullgraph=True, dynamic=False,
                           options=dict(cache_config=cache, calibrator_config=calib, inner=inner, handle=handle))

    def graph_cached():
        s, = [s for s in cache_stats(handle, "transformer") if s.unmatched is None]
        return list(s.cached_steps)

    ours = _requests(compiled, lambda t: handle.configure(dataclasses.replace(cache, residual_diff_threshold=t)
                                                          if indicator != "magcache" else INDICATORS[indicator](t)),
                     graph_cached)
    stats = dict(graphs=counters["stats"]["unique_graphs"], breaks=sum(counters["graph_break"].values()),
                 recompiles=dict(counters["recompiles"]), inner=len(inner_log))
    assert stats == dict(graphs=1, breaks=0, recompiles={}, inner=1), stats
    assert any(cached for cached, _ in theirs), "nothing cached: the cell tests nothing"
    for r, ((t_cached, t_out), (o_cached, o_out)) in enumerate(zip(theirs, ours)):
        assert o_cached == t_cached, f"request {r}: eager cached {t_cached}, graph {o_cached}"
        for i, (a, b) in enumerate(zip(o_out, t_out)):
            err = float((a - b).abs().max() / b.abs().max())
            assert err <= 1e-5, f"request {r} call {i}: {err:.3g} relative"
