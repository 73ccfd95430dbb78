"""The eager cache (cachedit_fx/install/eager.py): a model whose blocks break the graph in their own forward
caches through hooks on its block list, with one warning naming the cause; where both paths can run,
its decisions and outputs equal the graph path's. Tiny hand-written DiTs, no compile."""
from __future__ import annotations

import warnings

import pytest
import torch

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

from tests.helpers.tinydit import JointDiT, euler, latent


def pair():
    """The same weights with and without the host sync."""
    torch.manual_seed(0)
    clean = JointDiT().eval()
    synced = JointDiT(host_sync=True).eval()
    synced.load_state_dict(clean.state_dict())
    return clean, synced


def denoise(model, steps=10, requests=2):
    return euler(model, latent(), steps, latent(5, seed=2), requests=requests)


CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=4)


def run(model, calib=None, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cf.enable_cache(model, cache_config=CACHE, calibrator_config=calib, compile=False, **kw)
        try:
            outs = denoise(model)
            stats = cf.summary(model, logging=False)
            mode = cache_hook(model).mode
        finally:
            cf.disable_cache(model)
    return outs, stats, mode, [str(w.message) for w in caught if "cachedit" in str(w.message)]


@pytest.mark.parametrize("calib", [None, dict(taylorseer_order=2)], ids=["dbcache", "taylorseer2"])
def test_blocks_that_break_the_graph_cache_eagerly_like_the_graph_path(calib):
    clean, synced = pair()
    graph_outs, graph_stats, graph_mode, graph_warned = run(clean, calib)
    eager_outs, eager_stats, eager_mode, eager_warned = run(synced, calib)
    assert graph_mode is Mode.ONE_GRAPH and not graph_warned
    assert eager_mode is Mode.EAGER
    assert len(eager_warned) == 1 and "eager cache on transformer_blocks" in eager_warned[0] and \
        "item()" in eager_warned[0], eager_warned
    (g,), (e,) = graph_stats, eager_stats
    assert (e.chain, e.pattern, e.Fn, e.Bn) == (g.chain, g.pattern, g.Fn, g.Bn) == ("transformer_blocks[5]", "1", 1, 1)
    assert e.cached_steps == g.cached_steps and len(g.cached_steps) >= 3, (e.cached_steps, g.cached_steps)
    assert e.residual_diffs.keys() == g.residual_diffs.keys()
    for a, b in zip(eager_outs, graph_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    uncached = denoise(synced)  # disable_cache took the hooks off
    assert all(torch.equal(a, b) for a, b in zip(uncached, denoise(clean)))
    assert not any("forward" in m.__dict__ for m in synced.modules())


def test_eager_on_request_and_with_grad_runs_uncached():
    clean, _ = pair()
    ref = denoise(clean, requests=1)
    outs, stats, mode, warned = run(clean, eager=True)
    assert mode is Mode.EAGER and not warned and stats[0].cached_steps
    cf.enable_cache(clean, cache_config=CACHE, compile=False, eager=True)
    try:
        with_grad = clean(latent(), latent(5, seed=2), torch.tensor([1.0]))  # caching is inference-only: the plain forward
        assert with_grad.requires_grad and torch.equal(with_grad.detach(), ref[0])
    finally:
        cf.disable_cache(clean)


def test_eager_fn_bn_that_leave_no_middle_run_uncached_with_one_warning():
    clean, synced = pair()
    outs, stats, mode, warned = run(synced, None)
    assert mode is Mode.EAGER  # the base config caches
    cf.enable_cache(synced, cache_config=dict(CACHE, Fn_compute_blocks=3, Bn_compute_blocks=2), compile=False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = denoise(synced)
        ours = [str(w.message) for w in caught if "cachedit" in str(w.message)]
        assert cache_hook(synced).mode is Mode.UNCACHED
        assert len(ours) == 1 and "runs uncached" in ours[0] and "middle segment is empty" in ours[0], ours
        assert all(torch.equal(a, b) for a, b in zip(got, denoise(clean)))
    finally:
        cf.disable_cache(synced)
