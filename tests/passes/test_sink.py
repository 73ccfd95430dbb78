"""The sink pass: work only the full branch reads moves into it, so a cached call skips it.

Hand-built graphs check the pass's rules (what moves, what stays, aliasing operands) against the
graph run before the pass on both branches; the zoo's Flux checks the effect that motivates it: with
Bn = 0 a cached call runs the linear layers of the Fn-only model, no more.
"""
import copy
import operator

import pytest
import torch
from torch.fx import GraphModule

from cachedit_fx.capture.dynamo import capture
from cachedit_fx.config import DBCacheConfig
from cachedit_fx.config import PassSettings
from cachedit_fx.passes import apply
from cachedit_fx.passes.sink import sink_into_branches
from cachedit_fx import zoo


def _branch(fn, n):
    g = torch.fx.Graph()
    ph = [g.placeholder(f"operand_{i}") for i in range(n)]
    g.output(tuple(g.call_method("clone", (o,)) for o in fn(g, ph)))
    return GraphModule(torch.nn.Module(), g)


def _graph(build_outer, cached, full, n_operands):
    """A graph ``(x, w, flag) -> cond(flag, cached, full, operands) [+ other outputs]``."""
    root = torch.nn.Module()
    root.cached, root.full = _branch(cached, n_operands), _branch(full, n_operands)
    g = torch.fx.Graph()
    x, w, flag = (g.placeholder(n) for n in ("x", "w", "flag"))
    operands, extra = build_outer(g, x, w)
    cond = g.call_function(torch.ops.higher_order.cond, (flag, g.get_attr("cached"), g.get_attr("full"),
                                                          tuple(operands)))
    g.output((g.call_function(operator.getitem, (cond, 0)), *extra))
    gm = GraphModule(root, g)
    example = {"x": torch.randn(4, 8), "w": torch.randn(8, 8)}
    _Record(gm).run(example["x"], example["w"], torch.tensor(True))
    return gm, example


class _Record(torch.fx.Interpreter):
    """Runs the graph, keeping each node's value as Dynamo's ``example_value``."""

    def run_node(self, n):
        out = super().run_node(n)
        n.meta["example_value"] = out
        return out


def _run_both(gm, example):
    return [gm(example["x"], example["w"], torch.tensor(flag)) for flag in (True, False)]


def _close(a, b):
    return all(torch.allclose(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_work_only_the_full_branch_reads_moves_into_it():
    def outer(g, x, w):
        only_full = g.call_function(torch.mm, (g.call_function(torch.sin, (x,)), w))  # read by the full branch only
        return [x, only_full], []

    gm, example = _graph(outer, lambda g, ph: [ph[0]], lambda g, ph: [g.call_function(torch.add, (ph[0], ph[1]))], 2)
    before = _run_both(gm, example)
    moved = sink_into_branches(gm)
    assert moved == ["sin", "mm"]
    outer_ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.mm not in outer_ops and torch.sin not in outer_ops
    assert [n.target for n in gm.full.graph.nodes if n.op == "call_function"].count(torch.mm) == 1
    assert _close(before, _run_both(gm, example))


def test_work_both_branches_or_the_graph_read_stays():
    def outer(g, x, w):
        shared = g.call_function(torch.mm, (x, w))  # both branches read it
        used_after = g.call_function(torch.cos, (x,))  # the full branch and the graph's output read it
        return [shared, used_after], [used_after]

    gm, example = _graph(outer, lambda g, ph: [ph[0]],
                         lambda g, ph: [g.call_function(torch.add, (ph[0], ph[1]))], 2)
    before = _run_both(gm, example)
    assert sink_into_branches(gm) == []
    assert _close(before, _run_both(gm, example))


def test_a_read_of_a_tensor_written_in_place_stays():
    def outer(g, x, w):
        read = g.call_function(torch.mm, (x, w))
        g.call_method("mul_", (x, 2.0))  # after the read: moving the read would let it see the write
        return [x, read], []

    gm, example = _graph(outer, lambda g, ph: [ph[0]], lambda g, ph: [g.call_function(torch.add, (ph[0], ph[1]))], 2)
    assert sink_into_branches(gm) == []


def test_views_of_one_tensor_enter_the_branch_as_that_tensor():
    # A modulation vector chunked outside, two chunks read only by the moved work: the operands must not
    # alias each other, so the branch takes the vector and re-makes the chunks.
    def outer(g, x, w):
        emb = g.call_function(torch.mm, (x, w))
        chunks = g.call_method("chunk", (emb, 4, 1))
        a, b, c = (g.call_function(operator.getitem, (chunks, i)) for i in range(3))
        kept = g.call_function(torch.add, (a, 1.0))  # read outside the cond
        tail = g.call_function(torch.mul, (g.call_function(torch.add, (b, c)), 3.0))
        return [kept, tail], [kept]

    gm, example = _graph(outer, lambda g, ph: [ph[0]], lambda g, ph: [g.call_function(torch.add, (ph[0], ph[1]))], 2)
    before = _run_both(gm, example)
    moved = sink_into_branches(gm)
    assert moved == ["add_1", "mul"]
    operands = gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)[0].args[3]
    assert [o.name for o in operands] == ["add", "mm"]  # the chunks' base, not two of its views
    assert _close(before, _run_both(gm, example))


def _linears(gm: GraphModule, cached_branch: bool) -> int:
    graphs = [gm.graph]
    if cached_branch:
        graphs += [getattr(gm, n.target).graph for n in gm.graph.nodes
                   if n.op == "get_attr" and n.target.startswith("cachedit_cached")]
    return sum(1 for g in graphs for n in g.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)


@pytest.mark.parametrize("bn", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_flux_cached_call_runs_the_linears_of_the_fn_only_model(bn):
    transformer, inputs = zoo.build_transformer("flux")
    gm, _ = capture(transformer.eval(), kwargs=inputs)
    cache = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=bn, residual_diff_threshold=0.1)
    result = apply(gm, PassSettings(cache))
    assert result.modified
    fn_only = copy.deepcopy(transformer)
    n_double = len(fn_only.transformer_blocks)
    fn_only.transformer_blocks = torch.nn.ModuleList(list(fn_only.transformer_blocks)[:1])
    fn_only.single_transformer_blocks = torch.nn.ModuleList(list(fn_only.single_transformer_blocks)[
        len(fn_only.single_transformer_blocks) - bn:] if bn else [])
    ideal, _ = capture(fn_only, kwargs=inputs)
    ideal.graph.eliminate_dead_code()  # the compiler drops the last block's unused text stream there
    cached = _linears(result.graph_module, cached_branch=True)
    if bn == 0:
        # the text stream's tail of block 0 reaches only the skipped blocks: it moved into the full branch
        assert result.moved_into_branches
        assert cached == _linears(ideal, cached_branch=False)
    else:
        # the last block reads the text stream: block 0's tail feeds the forecast too, and stays
        assert n_double >= 2 and cached == _linears(ideal, cached_branch=False)
