"""One compile serves every resolution: the second token count compiles once more with dynamic sizes (torch's
automatic-dynamic recompile) and every further size compiles nothing, each size with state of its own, so
its decisions and outputs equal a static compile at that size; ``dynamic=False`` keeps a graph per size; the
bare backend's recompile runs cached too (no uncached warning)."""
from __future__ import annotations

import warnings

import pytest
import torch

import cachedit_fx as cf

from tests.helpers.dynamo import compile_own
from tests.helpers.tinydit import TinyDiT, euler, latent, tiny

CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.25, max_warmup_steps=1,
             enable_separate_cfg=False)
SIZES = (8, 12, 16)


def recording():
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) for x in example_inputs))  # compiled for dynamic sizes?
        return gm.forward
    return graphs, inner


def requests(model, sizes=SIZES):
    """One 6-step request per token count: (outputs, cached steps of the state set that served it)."""
    out = []
    for tokens in sizes:
        outs = euler(model, latent(tokens), 6)
        rows = {tuple(s.cached_steps) for s in cf.summary(model, logging=False)}
        out.append((outs, rows))
    return out


@pytest.fixture(scope="module")
def dynamic_run():
    model = tiny()
    graphs, inner = recording()
    cf.enable_cache(model, inner=inner, **CACHE)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        results = requests(model)
    return graphs, results, [str(w.message) for w in warned if "cachedit" in str(w.message)]


def static_at(tokens: int):
    model = tiny()
    cf.enable_cache(model, inner="eager", dynamic=False, **CACHE)
    outs = euler(model, latent(tokens), 6)
    (stats,) = cf.summary(model, logging=False)
    return outs, stats.cached_steps


def test_a_new_size_compiles_once_for_all_sizes_and_runs_cached(dynamic_run):
    graphs, _, warned = dynamic_run
    # the first size static, the second for every size, the third none (Dynamo remembers per source function
    # which sizes changed: after other tests of the class the first compile may already be the dynamic one)
    assert graphs in ([False, True], [True]), graphs
    assert warned == []


@pytest.mark.parametrize("k", [1, 2])
def test_each_size_decides_as_a_static_compile_at_that_size(dynamic_run, k):
    _, results, _ = dynamic_run
    outs, rows = results[k]
    static_outs, static_cached = static_at(SIZES[k])
    assert static_cached and tuple(static_cached) in rows, (static_cached, rows)
    for a, b in zip(outs, static_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dynamic_false_compiles_a_graph_per_size():
    model = tiny()
    graphs, inner = recording()
    cf.enable_cache(model, inner=inner, dynamic=False, **CACHE)
    requests(model)
    assert graphs == [False, False, False]


def test_the_bare_backend_recompile_for_a_new_size_runs_cached():
    model = tiny()
    graphs, inner = recording()
    compiled = compile_own(model, backend="cachedit", fullgraph=True, options=dict(cache_config=CACHE, inner=inner))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for tokens in SIZES:
            euler(compiled, latent(tokens), 4)
    # Dynamo remembers per source function which sizes changed, so after the tests above the first compile
    # may already be the dynamic one
    assert graphs in ([False, True], [True]), graphs
    assert not [w for w in warned if "uncached" in str(w.message)], [str(w.message) for w in warned]


def test_dynamic_must_be_none_true_or_false():
    with pytest.raises(cf.ConfigError, match="dynamic"):
        cf.enable_cache(tiny(), dynamic="yes", **CACHE)


def test_an_inner_compiler_failing_on_dynamic_sizes_leaves_a_graph_per_size():
    """An inner compile that fails on symbolic sizes (torch 2.13's Inductor on a cond operand of a
    concatenated length) is not a crash: the install compiles static shapes from then on, and each size
    decides and outputs as a static compile at that size."""
    attempts = []  # per inner compile: was it for dynamic sizes?

    def static_only(gm, example_inputs):
        dynamic = any(isinstance(x, torch.SymInt) or isinstance(x, torch.Tensor) and
                      any(isinstance(d, torch.SymInt) for d in x.shape) for x in example_inputs)
        attempts.append(dynamic)
        if dynamic:
            raise AssertionError("no code for symbolic sizes")
        return gm.forward

    model = tiny()
    cf.enable_cache(model, inner=static_only, **CACHE)
    runs = []
    for tokens in SIZES[:2]:
        runs.append((euler(model, latent(tokens), 6), [s.cached_steps for s in cf.summary(model, logging=False)]))
    # one compile for dynamic sizes failed (the first when Dynamo already saw this code at other sizes, else the
    # automatic-dynamic recompile), then each size compiled static
    assert attempts.count(True) == 1 and attempts.count(False) == 2 and attempts[-1] is False
    for tokens, (outs, cached) in zip(SIZES[:2], runs):
        want_outs, want_cached = static_at(tokens)
        assert max(float((a - b).abs().max()) for a, b in zip(outs, want_outs)) <= 1e-5
        assert want_cached in cached


def test_an_inner_compiler_failing_on_regions_inlines_them_and_keeps_one_compile_for_all_sizes():
    """A static compile that fails for another cause (the blocks as regions, say) is not taken for a failure
    on dynamic sizes: the blocks compile inline and the next sizes still share one dynamic graph."""
    from cachedit_fx.passes.regions import INVOKE

    attempts = []  # per inner compile: (regions in the graph, dynamic sizes)

    def no_regions(gm, example_inputs):
        calls = any(n.target is INVOKE for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                    for n in m.graph.nodes)
        attempts.append((calls, not all(isinstance(d, int) for x in example_inputs if isinstance(x, torch.Tensor)
                                        for d in x.shape)))
        if calls:
            raise AssertionError("no code for regions")
        return gm.forward

    class OwnCodeLocation(TinyDiT):  # Dynamo's automatic-dynamic state is per code location: other tests'
        def forward(self, *args, **kwargs):  # sizes would make the first compile dynamic
            return super().forward(*args, **kwargs)

    torch.manual_seed(0)
    model = OwnCodeLocation((("transformer_blocks", 8),)).eval()  # enough blocks for regions
    cf.enable_cache(model, inner=no_regions, **CACHE)
    for tokens in SIZES:
        euler(model, latent(tokens), 2)
    assert attempts[0] == (True, False) and all(not calls for calls, _ in attempts[1:]), attempts
    assert [dynamic for _, dynamic in attempts[1:]] == [False, True], attempts  # 3rd size: nothing compiled


@pytest.mark.slow
@pytest.mark.inductor
def test_under_inductor_a_size_past_the_cpu_reduction_chunk_compiles_nothing():
    """Inductor's C++ code chunks a float sum over more than 4096 elements and guards the size to its side of
    that line: the glue's relative L1 reduces over the channels first (runtime/algorithm._abs_sums), so the
    token count it guards is the rows' (> 4096 tokens), not tokens x channels (here 3200 / 3840 / 4800)."""
    from torch._dynamo.utils import counters

    class OwnCodeLocation(TinyDiT):  # a first compile for static sizes, whatever other tests compiled
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    torch.manual_seed(0)
    model = OwnCodeLocation((("transformer_blocks", 4),)).eval()
    cf.enable_cache(model, inner="inductor", **CACHE)
    graphs = []
    for tokens in (200, 240, 300):
        euler(model, latent(tokens), 2)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1] == graphs[0] + 1, graphs  # a static graph, then one dynamic graph for all


def wan_requests(model, sides=(4, 6, 8), steps=4):
    """One request per latent side of the zoo Wan (tokens ``2 * (side // 2) ** 2``, a size Dynamo writes with
    floor divisions): (outputs, cached steps) per side."""
    from cachedit_fx.zoo.recipes.wan import transformer_inputs

    out = []
    for side in sides:
        kwargs = transformer_inputs(model)
        kwargs["hidden_states"] = torch.randn(1, 16, 2, side, side, generator=torch.Generator().manual_seed(side))
        outs = []
        with torch.no_grad():
            for i in range(steps):
                outs.append(model(**{**kwargs, "timestep": torch.tensor([1000.0 * (1 - i / steps)])})[0])
        rows = {tuple(s.cached_steps) for s in cf.summary(model, logging=False)}
        out.append((outs, rows))
    return out


def zoo_wan():
    from cachedit_fx.zoo import build_transformer

    transformer, _ = build_transformer("wan")

    class OwnCodeLocation(type(transformer)):  # a first compile for static sizes, as a user's
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    transformer.__class__ = OwnCodeLocation
    return transformer


WAN_CACHE = dict(CACHE, residual_diff_threshold=0.5)


@pytest.mark.slow
def test_wan_tokens_from_floor_divisions_compile_once_for_all_sizes():
    """torch.cond merges its branches' output strides only as products of sizes (a contiguous clone's are
    products of max(size, 1)): the branches return copies strided by the plain products
    (passes/rewrite.fresh_dense), so Wan's dynamic compile succeeds instead of going static per size."""
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def inner(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        return aot_eager(gm, example_inputs)

    model = zoo_wan()
    cf.enable_cache(model, inner=inner, **WAN_CACHE)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        results = wan_requests(model)
    assert graphs in ([False, True], [True]), graphs  # [True]: Dynamo remembers the sizes that changed
    assert not [w for w in warned if "cachedit" in str(w.message)], [str(w.message) for w in warned]
    static = zoo_wan()
    cf.enable_cache(static, inner="eager", dynamic=False, **WAN_CACHE)
    (static_outs, static_rows), = wan_requests(static, sides=(8,))
    outs, rows = results[2]
    assert static_rows == rows and any(static_rows), (static_rows, rows)
    for a, b in zip(outs, static_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.inductor
def test_under_inductor_wan_sizes_from_floor_divisions_compile_once_for_all_sizes():
    """Inductor compiles a cond branch as a function of its operands and must find the symbols of their
    sizes among them: the graph's size symbols are passed to the cond (passes/rewrite.size_symbols)."""
    from torch._dynamo.utils import counters

    model = zoo_wan()
    cf.enable_cache(model, inner="inductor", **WAN_CACHE)
    graphs = [counters["stats"]["unique_graphs"]]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for side in (4, 6, 8):
            wan_requests(model, sides=(side,), steps=2)
            graphs.append(counters["stats"]["unique_graphs"])
    # a static graph and one dynamic graph for all sizes, or (Dynamo remembering the sizes that changed in
    # the test above) the dynamic one first; either way the third size compiles nothing
    assert graphs[3] == graphs[2] and graphs[2] - graphs[0] in (1, 2) and graphs[1] > graphs[0], graphs
    assert not [w for w in warned if "cachedit" in str(w.message)], [str(w.message) for w in warned]
