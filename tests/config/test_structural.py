"""Every field compiled into the graph (marked ``structural`` on the config dataclasses) changed through
``refresh_context`` gives what a fresh install with the new config gives — the same state layout, cached
steps and outputs — never a stale graph; a bare backend compile refuses the change by name."""
from __future__ import annotations

import pytest
import torch

import cachedit_fx as cf
from cachedit_fx import zoo
from cachedit_fx.config import DBCacheConfig, TaylorSeerCalibratorConfig, structural_fields
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode
from tests.helpers.dynamo import compile_own

STEPS = 6
BASE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.9, max_warmup_steps=1,
            enable_separate_cfg=True, cfg_diff_compute_separate=False)
CALIB = dict(taylorseer_order=1)
# (config, field, new value): every structural field, each changed from BASE / CALIB; ("calib", None, CALIB)
# starts without a calibrator and adds one.
CHANGES = [
    ("cache", "cache_type", "NONE"),
    ("cache", "Fn_compute_blocks", 2),
    ("cache", "Bn_compute_blocks", 1),
    ("cache", "enable_separate_cfg", False),
    ("cache", "cfg_compute_first", True),
    ("cache", "cfg_diff_compute_separate", True),
    ("cache", "per_sample", True),
    ("calib", "enable_calibrator", False),
    ("calib", "enable_encoder_calibrator", False),
    ("calib", "calibrator_type", "taylorseer"),  # the only kind here: set again, it changes nothing
    ("calib", "calibrator_cache_type", "hidden_states"),
    ("calib", "calibrator_kwargs", {"n_derivatives": 1}),
    ("calib", "taylorseer_order", 2),
    ("calib", None, CALIB),
]


def test_the_changes_cover_every_structural_field():
    covered = {(kind, f) for kind, f, _ in CHANGES}
    want = {("cache", f) for f in structural_fields(DBCacheConfig)} | \
        {("calib", f) for f in structural_fields(TaylorSeerCalibratorConfig)}
    assert want <= covered, sorted(want - covered)


@pytest.fixture(scope="module")
def flux():
    """The zoo Flux on a batch of two (per-sample decisions have two slots)."""
    transformer, inputs = zoo.build_transformer("flux")
    doubled = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    return transformer, {k: torch.cat([v, v * 0.5 if k != "timestep" else v]) if k in doubled else v
                         for k, v in inputs.items()}


def _request(transformer, inputs) -> list[torch.Tensor]:
    """A CFG loop (two calls per step, as separate-CFG pipelines make); every call's output."""
    _, outs = zoo.denoise(transformer, "flux", inputs, num_steps=STEPS, uncond={}, guidance=1.0)
    return outs


def _observed(transformer, inputs):
    outs = _request(transformer, inputs)
    hook = cache_hook(transformer)
    return outs, [c.layout for c in hook.handle.chains], cf.strify(transformer), hook.mode


def _plan(kind, field, value):
    """(first cache config, first calibrator config, refresh_context keywords, the configs after it)."""
    if field is None:
        return BASE, None, dict(calibrator_config=TaylorSeerCalibratorConfig(**value)), (BASE, value)
    if kind == "cache":
        return BASE, CALIB, dict(cache_config=DBCacheConfig().reset(**{field: value})), ({**BASE, field: value}, CALIB)
    return BASE, CALIB, dict(calibrator_config=TaylorSeerCalibratorConfig().reset(**{field: value})), \
        (BASE, {**CALIB, field: value})


@pytest.mark.slow
@pytest.mark.parametrize("kind,field,value", CHANGES, ids=[f"{k}.{f}" for k, f, _ in CHANGES])
def test_refresh_of_a_structural_field_equals_a_fresh_install(flux, kind, field, value):
    transformer, inputs = flux
    cache, calib, refresh, (new_cache, new_calib) = _plan(kind, field, value)
    cf.enable_cache(transformer, cache_config=new_cache, calibrator_config=new_calib, compile=False)
    try:
        want = _observed(transformer, inputs) if new_cache.get("cache_type") != "NONE" else None
    finally:
        cf.disable_cache(transformer)
    cf.enable_cache(transformer, cache_config=cache, calibrator_config=calib, compile=False)
    try:
        _request(transformer, inputs)  # compiled and run with the old structure
        cf.refresh_context(transformer, **refresh)
        got = _observed(transformer, inputs)
    finally:
        cf.disable_cache(transformer)
    if want is None:  # CacheType.NONE: the plain forward
        want = (_request(transformer, inputs), [], got[2], Mode.UNCACHED)
    assert got[1:] == want[1:]
    assert len(got[0]) == len(want[0]) and all(torch.equal(a, b) for a, b in zip(got[0], want[0]))


@pytest.mark.slow
def test_none_then_dbcache_caches_again(flux):
    transformer, inputs = flux
    cf.enable_cache(transformer, cache_config=BASE, compile=False)
    try:
        cf.refresh_context(transformer, cache_type="NONE")
        _request(transformer, inputs)
        assert cache_hook(transformer).mode is Mode.UNCACHED and not cache_hook(transformer).handle.graphs
        cf.refresh_context(transformer, cache_type="DBCache")
        _request(transformer, inputs)
        assert cache_hook(transformer).mode is Mode.ONE_GRAPH
        assert cf.summary(transformer, logging=False)[0].cached_steps
    finally:
        cf.disable_cache(transformer)


@pytest.mark.slow
def test_a_bare_backend_compile_refuses_every_structural_field_by_name(flux):
    transformer, inputs = flux
    compiled = compile_own(transformer, backend="cachedit", dynamic=False,
                             options={"cache_config": BASE, "calibrator_config": CALIB, "inner": "eager"})
    try:
        with torch.no_grad():
            compiled(**inputs)
        for kind, field, value in CHANGES:
            _, _, refresh, _ = _plan(kind, field, value)
            if field in ("calibrator_type", None):  # no change / a calibrator already there
                continue
            with pytest.raises(cf.ConfigError, match=f"{field} .*compiled into"):
                cf.refresh_context(transformer, **refresh)
    finally:
        del transformer.forward
