"""Blocks as compiled regions inside the one cached graph: each block an ``invoke_subgraph`` call of one body
per block class (in the Fn segment, the cond's full branch and Bn alike), with the decisions and outputs of
the flat graph (every block inline); marking leaves the block class and other instances untouched."""
from __future__ import annotations

import pytest
import torch

import cachedit_fx as cf
from cachedit_fx.capture import regions as marking
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.passes.regions import INVOKE

from tests.helpers.tinydit import Block, euler, latent, tiny

CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=1,
             enable_separate_cfg=False)


def region_calls(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(invoke_subgraph calls, distinct bodies) in ``gm`` and every subgraph it holds (cond branches)."""
    calls, bodies = 0, set()
    for owner in (m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)):
        for node in owner.graph.nodes:
            if node.op == "call_function" and node.target is INVOKE:
                calls += 1
                bodies.add(id(getattr(owner, node.args[0].target)))
    return calls, len(bodies)


def run(flat: bool, blocks: int = 8):
    """One request of a tiny DiT under enable_cache with a recording inner compiler: (outputs, cached
    steps, the rewritten graphs the inner compiler got, the model)."""
    model = tiny(("transformer_blocks", blocks))
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cf.enable_cache(model, inner=inner, **CACHE)
    if flat:
        cache_hook(model).graph.regions_off = "the test's flat graph"
    outs = euler(model, latent(), 6)
    (stats,) = cf.summary(model, logging=False)
    return outs, stats.cached_steps, graphs, model


@pytest.fixture(scope="module")
def both():
    return run(flat=False), run(flat=True)


def test_every_block_is_a_call_of_one_compiled_body(both):
    (_, _, graphs, model), (_, _, flat_graphs, _) = both
    assert len(graphs) == 1
    # 8 blocks: the Fn and Bn blocks are inlined (the rewrite reads Fn's nodes; Inductor cannot lower a body
    # called both inside a cond branch and outside it), the 6 middle ones in the cond's full branch call the
    # one body of the one block class
    assert region_calls(graphs[0]) == (6, 1)
    assert region_calls(flat_graphs[0]) == (0, 0)
    assert len(cache_hook(model).graph.regions) == 8


def test_decisions_and_outputs_equal_the_flat_graph(both):
    (outs, cached, _, _), (flat_outs, flat_cached, _, _) = both
    assert cached == flat_cached and cached, (cached, flat_cached)
    for a, b in zip(outs, flat_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_marking_swaps_the_instance_class_only_and_unmark_restores_it():
    model, other = tiny(), tiny()
    marked = marking.mark(model)
    assert len(marked) == 4 and all(marking.is_marked(b) and isinstance(b, Block) for b in marked)
    assert type(other.transformer_blocks[0]) is Block and Block.forward is not type(marked[0]).forward
    x, t = latent(), torch.tensor([1.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), other(x, t), rtol=0, atol=0)  # regions run eagerly as before
    assert marking.unmark(model) == 4 and all(type(b) is Block for b in model.transformer_blocks)


def test_disable_cache_unmarks_the_blocks():
    model = tiny(("transformer_blocks", 8))
    cf.enable_cache(model, inner="eager", **CACHE)
    euler(model, latent(), 2)
    assert all(marking.is_marked(b) for b in model.transformer_blocks)
    cf.disable_cache(model)
    assert all(type(b) is Block for b in model.transformer_blocks)


def test_a_model_with_few_blocks_compiles_them_inline():
    """Below MIN_BLOCKS repeated blocks a region saves little compile time and costs every call (host time per
    region call, no fusion across blocks): the graph is the flat one, with the reason in the log."""
    _, _, graphs, model = run(flat=False, blocks=marking.MIN_BLOCKS - 1)
    assert region_calls(graphs[0]) == (0, 0) and not cache_hook(model).graph.regions
    assert "fewer than" in cache_hook(model).graph.regions_off
    assert not any(marking.is_marked(b) for b in model.transformer_blocks)
