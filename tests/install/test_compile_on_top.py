"""A torch.compile on top of enable_cache (module, method, fullgraph), and configs that do not fit: a
mask that is no list of bits, configure changing a field compiled into the graph."""
from __future__ import annotations

import pytest
import torch

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook

from tests.helpers.crossdit import CACHE, cached_steps, request, same
from tests.helpers.tinydit import cross_dit, uniform


# ----------------------------------------------------------------------------- compile on top


@pytest.fixture
def installed():
    model = cross_dit()
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    want = request(model, uniform(8))
    cf.reset(model)
    yield model, want
    cf.disable_cache(model)


def test_torch_compile_on_top_of_enable_cache_caches(installed):
    model, want = installed
    compiled = torch.compile(model, backend="eager")
    assert same(request(compiled, uniform(8)), want)
    assert cached_steps(model) > 0


def test_module_compile_on_top_of_enable_cache_caches(installed):
    model, want = installed
    model.compile(backend="eager")
    assert same(request(model, uniform(8)), want)
    assert cached_steps(model) > 0


def test_fullgraph_compile_on_top_of_enable_cache_says_what_to_do(installed):
    model, _ = installed
    # About Dynamo's caches: this compiles the install's forward, one code object for every install. The
    # tests above compiled it without fullgraph, and their entries' guards pass for this model too: a cache
    # hit would run them (breaks and all) instead of tracing with fullgraph=True. Start from empty caches.
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="enable_cache compiles the transformer itself"):
        request(compiled, uniform(2))


# ----------------------------------------------------------------------------- configs that do not fit


@pytest.mark.parametrize("mask, why", [(5, "list"), ({0: 1, 1: 0}, "list"), ([True, False], "0 and 1"),
                                        ("1100", "list")])
def test_a_mask_that_is_no_list_of_bits_names_the_field(mask, why):
    with pytest.raises(cf.ConfigError, match=f"steps_computation_mask.*{why}"):
        cf.enable_cache(cross_dit(), cache_config=dict(CACHE, steps_computation_mask=mask), compile=False)


def test_configure_refuses_fields_compiled_into_the_graph(installed):
    model, _ = installed
    request(model, uniform(3))
    handle = cache_hook(model).handle
    with pytest.raises(cf.ConfigError, match="Fn_compute_blocks are compiled into the graphs"):
        handle.configure(cf.DBCacheConfig(**dict(CACHE, Fn_compute_blocks=3)))
    assert "F1" in cf.strify(model)
    handle.configure(cf.DBCacheConfig(**dict(CACHE, residual_diff_threshold=0.5)))  # a number: taken
