"""A rewritten graph sent to another process (backend/wire.py): rebuilt node for node, with the same code
(what Inductor's and AOTAutograd's caches key on) and the same outputs, regions and cond branches included;
step functions pickle by value; what cannot be sent says so."""
from __future__ import annotations

import operator
import pickle

import pytest
import torch

import cachedit_fx as cf
from cachedit_fx.backend import wire
from cachedit_fx.passes import steps as step_module
from cachedit_fx.passes.regions import INVOKE
from cachedit_fx.passes.steps import TaggedStep

from tests.helpers.tinydit import latent, tiny

CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=1,
             enable_separate_cfg=False)


def rewritten(blocks: int):
    """(the rewritten graph the inner compiler got, its example inputs) for a tiny DiT; 8 blocks make the
    middle ones region calls."""
    got = []

    def inner(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    model = tiny(("transformer_blocks", blocks))
    cf.enable_cache(model, inner=inner, dynamic=False, **CACHE)  # what goes to a child: static shapes
    with torch.no_grad():
        model(latent(), torch.tensor([1.0]))
    (graph,) = got
    return graph


def all_nodes(gm):
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]


@pytest.mark.parametrize("blocks", [4, 8])
def test_a_rewritten_graph_rebuilds_with_the_same_code_and_outputs(blocks):
    gm, inputs = rewritten(blocks)
    loaded = wire.loads(wire.dumps(gm))
    assert loaded.code == gm.code
    def codes(root):
        return {name: m.code for name, m in root.named_modules() if isinstance(m, torch.fx.GraphModule)}

    assert codes(loaded) == codes(gm)
    assert any(n.target is torch.ops.higher_order.cond for n in all_nodes(loaded))
    assert any(n.target is INVOKE for n in all_nodes(loaded)) == (blocks == 8)
    # the step calls keep what AOTAutogradCache keys them by
    tagged = [n for n in all_nodes(loaded) if isinstance(n.target, TaggedStep)]
    assert tagged and all(n.meta["user_cache_hash"] == n.target.cache_tag for n in tagged)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), gm(*inputs), rtol=0, atol=0)


def test_a_step_function_pickles_by_value_and_is_published_under_its_name():
    gm, _ = rewritten(4)
    step = next(n.target for n in all_nodes(gm) if isinstance(n.target, TaggedStep))
    delattr(step_module, step.__name__)  # as in a process that never rewrote this graph
    copy = pickle.loads(pickle.dumps(step))
    assert copy is not step and getattr(step_module, step.__name__) is copy
    assert (copy.cache_tag, copy.step_name, copy.layout) == (step.cache_tag, step.step_name, step.layout)


def test_what_cannot_be_sent_says_why():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(lambda v: v + 1, (x,)))
    with pytest.raises((pickle.PicklingError, AttributeError)):
        wire.dumps(torch.fx.GraphModule(torch.nn.Module(), graph))

    root = torch.nn.Module()
    root.scale = 2.0
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(operator.mul, (x, graph.get_attr("scale"))))
    with pytest.raises(TypeError, match="get_attr scale reads a float"):
        wire.dumps(torch.fx.GraphModule(root, graph))
