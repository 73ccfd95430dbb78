"""The one pass pipeline (``passes.apply``): every chain or the longest, the input back with the reason
where nothing matches, and ``chains="all"`` through the backend (tiny hand-written DiT, eager inner)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cachedit_fx as cf
from cachedit_fx import zoo
from cachedit_fx.capture.dynamo import capture
from cachedit_fx.config import ChainPolicy, DBCacheConfig, PassSettings
from cachedit_fx.passes import apply

from tests.helpers.dynamo import compile_own
from tests.helpers.tinydit import D, euler, latent, tiny

CACHE = dict(Fn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=1)
TWO_CHAINS = (("blocks", 4), ("late_blocks", 3))


def denoise(model, steps=6):
    """The outputs of one request."""
    return euler(model, latent(), steps)


def rows_of(model):
    return [r for r in cf.summary(model, details=True) if r.unmatched is None]


def test_apply_rewrites_every_chain_or_returns_the_input_with_the_reason():
    model = tiny(*TWO_CHAINS)
    args = (latent(), torch.tensor([1.0]))
    gm, example_inputs = capture(model, args)
    cfg = DBCacheConfig(**CACHE)
    longest = apply(gm, PassSettings(cfg))
    both = apply(gm, PassSettings(cfg, chains=ChainPolicy.ALL))
    assert [c.info.name for c in longest.chains] == ["blocks[4]"]
    assert [c.info.name for c in both.chains] == ["blocks[4]", "late_blocks[3]"]
    assert both.graph_module is not gm and both.modified
    states = [t for c in both.chains for t in c.state.ordered()]
    with torch.no_grad():  # the first call computes every block: equal to the uncaptured model
        torch.testing.assert_close(both.graph_module(*example_inputs, *states), (model(*args),), rtol=0, atol=0)
    mlp_gm, _ = capture(nn.Sequential(nn.Linear(D, D), nn.GELU()).eval(), (latent(),))
    none = apply(mlp_gm, PassSettings(cfg))
    assert none.graph_module is mlp_gm and not none.chains and "no repeated transformer blocks" in none.unmatched


def test_chains_all_through_the_backend_caches_both_chains():
    model = tiny(*TWO_CHAINS)
    compiled = compile_own(model, backend="cachedit", fullgraph=True, dynamic=False,
                           options=dict(cache_config=CACHE, chains="all", inner="eager"))
    denoise(compiled)
    rows = rows_of(model)
    assert [r.chain for r in rows] == ["blocks[4]", "late_blocks[3]"]
    assert all(r.steps == 6 and r.cached_steps for r in rows), rows


def test_the_step_functions_a_rewritten_graph_calls_are_found_by_name_for_the_on_disk_caches():
    """AOTAutogradCache pickles the graph to key it; a GraphModule pickles its call targets by import path."""
    import importlib
    import pickle

    from torch.package import sys_importer

    gm, _ = capture(tiny(("blocks", 4)), (latent(), torch.tensor([1.0])))
    result = apply(gm, PassSettings(DBCacheConfig(**CACHE)))
    modules = [result.graph_module, *(m for m in result.graph_module.modules() if isinstance(m, torch.fx.GraphModule))]
    steps = {n.target for m in modules for n in m.graph.nodes
             if n.op == "call_function" and getattr(n.target, "cache_tag", None)}
    assert len(steps) >= 4  # pre_step, cached_step, computed_step, post_step
    for step in steps:
        module, name = sys_importer.get_name(step)
        assert getattr(importlib.import_module(module), name) is step and step.cache_tag in name
    assert pickle.dumps(result.graph_module)


@pytest.mark.parametrize("name", ["wan", "flux", "cogvideox", "pixart"])
def test_a_rewritten_zoo_graph_passes_the_aot_autograd_cache_check(name):
    """AOTAutogradCache bypasses a graph with a node it cannot key: e.g. a method called on a node without an
    example value (Wan's ``.float()`` of the cond's output), and then a restart compiles everything again."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    from cachedit_fx.backend.inner import CACHED_GRAPH_INDUCTOR_OPTIONS

    torch.manual_seed(0)
    transformer, kwargs = zoo.build_transformer(name)
    gm, _ = capture(transformer, kwargs=kwargs)
    result = apply(gm, PassSettings(DBCacheConfig(**CACHE)))
    assert result.chains, result.unmatched
    with torch._inductor.config.patch(CACHED_GRAPH_INDUCTOR_OPTIONS):  # what the backend compiles under
        check_cacheable(result.graph_module)  # raises BypassAOTAutogradCache naming the node
