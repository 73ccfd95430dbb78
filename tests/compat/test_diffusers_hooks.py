"""Differential tests against diffusers 0.42's own cache hooks: FirstBlockCache and MagCache applied with
``transformer.enable_cache(config)`` on the tiny zoo Flux, against cachedit-fx's ``FirstBlockCacheConfig`` /
``MagCacheConfig`` (decided in the rewritten graph, run without an inner compiler) on a copy of the same
model: the same skipped steps, outputs within 1e-5 relative, and MagCache's calibration run records the
same ratios diffusers prints. Two requests on our side (``refresh_context`` between, the second with
another threshold), each against a fresh diffusers install (diffusers resets its hook state per pipeline
call). Each calibrator composes with these indicators: covered by tests/backend/test_cells.py."""
from __future__ import annotations

import contextlib
import copy
import io

import pytest

import cachedit_fx
from cachedit_fx import zoo

from tests.helpers.differential import Request, assert_same

STEPS = 8

hooks = pytest.importorskip("diffusers.hooks")


def _head_state(model, name: str):
    return model.transformer_blocks[0]._diffusers_hook.get_hook(name).state_manager.get_state()


def diffusers_request(base, inputs, config, hook: str) -> Request:
    """One request through diffusers' hook on a fresh copy of ``base``: skipped steps and outputs."""
    model = copy.deepcopy(base)
    model.enable_cache(config)
    computed = []

    def call(**kw):
        with model.cache_context("cond"):
            out = model(**kw)
            computed.append(bool(_head_state(model, hook).should_compute))
        return out

    with contextlib.redirect_stdout(io.StringIO()):
        outputs = zoo.denoise(call, "flux", inputs, num_steps=STEPS)[1]
    return Request([i for i, c in enumerate(computed) if not c], {}, outputs=outputs)


def our_requests(base, inputs, config, second_threshold: float) -> list[Request]:
    model = copy.deepcopy(base)
    cachedit_fx.enable_cache(model, cache_config=config, compile=False)
    out = []
    for r in range(2):
        if r:
            cachedit_fx.refresh_context(model, residual_diff_threshold=second_threshold)
        outputs = zoo.denoise(model, "flux", inputs, num_steps=STEPS)[1]
        s, = [s for s in cachedit_fx.summary(model, logging=False) if s.unmatched is None]
        out.append(Request(list(s.cached_steps), {}, outputs=outputs))
    return out


@pytest.fixture(scope="module")
def flux():
    return zoo.build_transformer("flux")


@pytest.mark.slow
@pytest.mark.parametrize("thresholds", [(0.5, 0.35), (0.3, 0.6)])
def test_first_block_cache_matches_diffusers(flux, thresholds):
    base, inputs = flux
    theirs = [diffusers_request(base, inputs, hooks.FirstBlockCacheConfig(threshold=t), "fbc_leader_block_hook")
              for t in thresholds]
    ours = our_requests(base, inputs, cachedit_fx.FirstBlockCacheConfig(threshold=thresholds[0]), thresholds[1])
    assert_same(theirs, ours)


def _diffusers_ratios(base, inputs) -> list[float]:
    printed = io.StringIO()
    model = copy.deepcopy(base)
    model.enable_cache(hooks.MagCacheConfig(num_inference_steps=STEPS, calibrate=True))
    with contextlib.redirect_stdout(printed), model.cache_context("cond"):
        zoo.denoise(model, "flux", inputs, num_steps=STEPS)
    line = [ln for ln in printed.getvalue().splitlines() if ln.strip().startswith("[")][-1]
    return [float(x) for x in line.strip(" []").split(",")]


@pytest.mark.slow
def test_magcache_calibration_and_decisions_match_diffusers(flux):
    base, inputs = flux
    theirs_ratios = _diffusers_ratios(base, inputs)
    model = copy.deepcopy(base)
    cachedit_fx.enable_cache(model, cache_config=cachedit_fx.MagCacheConfig(num_inference_steps=STEPS, calibrate=True),
                             compile=False)
    zoo.denoise(model, "flux", inputs, num_steps=STEPS)
    s, = [s for s in cachedit_fx.summary(model, logging=False) if s.unmatched is None]
    assert s.cached_steps == []
    assert len(s.mag_ratios) == STEPS
    assert s.mag_ratios == pytest.approx(theirs_ratios, rel=1e-4, abs=1e-5)
    for fields, second in ((dict(), 0.24), (dict(max_skip_steps=1, retention_ratio=0.0), 0.06)):
        first = 0.06 if second == 0.24 else 0.24
        theirs = [diffusers_request(base, inputs, hooks.MagCacheConfig(
            threshold=t, num_inference_steps=STEPS, mag_ratios=theirs_ratios, **fields), "mag_cache_leader_block_hook")
            for t in (first, second)]
        ours = our_requests(base, inputs, cachedit_fx.MagCacheConfig(
            threshold=first, num_inference_steps=STEPS, mag_ratios=s.mag_ratios, **fields), second)
        assert_same(theirs, ours)
