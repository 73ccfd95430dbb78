"""The eager cache (cachedit_fx/install/eager.py): a model whose blocks break the graph in their own forward
caches through hooks on its block list, with one warning naming the cause; where both paths can run,
its decisions and outputs equal the graph path's. Tiny hand-written DiTs, no compile."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

from tests.helpers.tinydit import D, JointBlock, JointDiT, euler, latent


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


class TwoListDiT(JointDiT):
    """Blocks in two lists, as Flux's ``transformer_blocks`` and ``single_transformer_blocks``: the second
    fed directly by the first, or (``glue``) through a change of its streams between the loops; a list
    of text projections registered after them runs before them (as HiDream's ``caption_projection``)."""

    def __init__(self, glue: bool = False):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(JointBlock(False) for _ in range(3))
        self.single_transformer_blocks = nn.ModuleList(JointBlock(False) for _ in range(3))
        self.text_projections = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.glue = glue

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        h = self.proj_in(hidden_states) + self.time(timestep[:, None])[:, None]
        e = self.text_in(encoder_hidden_states)
        for projection in self.text_projections:
            e = e + projection(e)
        for block in self.transformer_blocks:
            e, h = block(h, e)
        if self.glue:
            e = e * 0.5
        for block in self.single_transformer_blocks:
            e, h = block(h, e)
        return self.proj_out(h)


@pytest.mark.parametrize("calib", [None, dict(taylorseer_order=1)], ids=["dbcache", "taylorseer1"])
def test_the_eager_cache_joins_block_lists_as_the_graph_path_does(calib):
    """The graph path's chain runs across both lists; so does the eager cache: the same chain, cached
    steps and outputs (cached steps skip the second list's middle blocks too)."""
    torch.manual_seed(0)
    model = TwoListDiT().eval()
    graph_outs, (g,), graph_mode, _ = run(model, calib)
    eager_outs, (e,), eager_mode, warned = run(model, calib, eager=True)
    assert graph_mode is Mode.ONE_GRAPH and eager_mode is Mode.EAGER and not warned
    assert e.chain == g.chain == "transformer_blocks[3]+single_transformer_blocks[3]", (e.chain, g.chain)
    assert e.cached_steps == g.cached_steps and len(g.cached_steps) >= 3, (e.cached_steps, g.cached_steps)
    for a, b in zip(eager_outs, graph_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lists_joined_through_glue_leave_the_eager_chain_at_the_first():
    """Where the model changes the streams between the lists, the eager chain ends at the first list
    (found on the first call, which still caches its state): it caches, and the second list always runs."""
    torch.manual_seed(0)
    model = TwoListDiT(glue=True).eval()
    runs = [0]
    model.single_transformer_blocks[1].register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    outs, (e,), mode, warned = run(model, eager=True)
    assert mode is Mode.EAGER and not warned
    assert e.chain == "transformer_blocks[3]" and len(e.cached_steps) >= 3, (e.chain, e.cached_steps)
    assert runs[0] == len(outs)
    assert not any("forward" in m.__dict__ for m in model.modules())


def _zoo_request(name: str, base, inputs, eager: bool, fn_bn, calib):
    import copy

    from cachedit_fx.zoo.denoise import denoise

    model = copy.deepcopy(base)
    cf.enable_cache(model, cache_config=dict(Fn_compute_blocks=fn_bn[0], Bn_compute_blocks=fn_bn[1],
                                             residual_diff_threshold=0.9, max_warmup_steps=2),
                    calibrator_config=calib, inner="eager", eager=eager)
    final, outs = denoise(model, name, inputs, num_steps=8)
    stats = [(s.chain, s.cached_steps) for s in cf.summary(model, logging=False)]
    return [*outs, final], stats


@pytest.mark.slow
@pytest.mark.parametrize("name,fn_bn,calib", [
    ("flux", (1, 0), None), ("flux", (1, 0), dict(taylorseer_order=1)), ("flux", (2, 1), None),
    ("flux", (2, 1), dict(taylorseer_order=1)), ("wan", (1, 0), None), ("wan", (2, 1), dict(taylorseer_order=1)),
    ("pixart", (1, 0), dict(taylorseer_order=1)), ("pixart", (2, 1), None)])
def test_zoo_eager_cache_equals_the_graph_path(name, fn_bn, calib):
    """Flux (a chain across two lists), Wan and PixArt (pattern 3): the same chain, cached steps and
    outputs with eager=True as through the graph."""
    from cachedit_fx import zoo

    base, inputs = zoo.build_transformer(name)
    base.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph_outs, graph_stats = _zoo_request(name, base, inputs, False, fn_bn, calib)
        eager_outs, eager_stats = _zoo_request(name, base, inputs, True, fn_bn, calib)
    assert eager_stats == graph_stats and graph_stats[0][1], (eager_stats, graph_stats)
    for a, b in zip(eager_outs, graph_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
