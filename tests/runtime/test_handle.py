"""How a module's handles are found: through the weight *objects* its graphs read (held weakly), never
through tensor addresses — tensor-subclass and meta weights report ``data_ptr() == 0``, and a new model
may reuse a freed model's storage."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import cachedit_fx as cf
from cachedit_fx.config import DBCacheConfig
from cachedit_fx.runtime.handle import CacheHandle, CompiledGraph, handles_for
from tests.helpers.dynamo import compile_own
from tests.helpers.tinydit import euler, latent, tiny


def _handle_over(module: nn.Module) -> CacheHandle:
    handle = CacheHandle(DBCacheConfig(), None)
    handle.add(CompiledGraph([], unmatched="test"), list(module.parameters()))
    return handle


def test_weights_at_address_zero_find_only_their_own_module():
    a, b = nn.Linear(4, 4, device="meta"), nn.Linear(4, 4, device="meta")
    assert all(p.data_ptr() == 0 for p in [*a.parameters(), *b.parameters()])
    handle = _handle_over(a)
    assert handles_for(a) == [handle] and handles_for(b) == []


def test_a_new_model_in_a_freed_models_storage_finds_nothing():
    a = nn.Linear(64, 64)
    handle = _handle_over(a)
    addresses = {p.data_ptr() for p in a.parameters()}
    del a
    gc.collect()
    for _ in range(8):  # the allocator usually hands the same blocks back; either way nothing may match
        b = nn.Linear(64, 64)
        assert handles_for(b) == []
        if {p.data_ptr() for p in b.parameters()} & addresses:
            break
    assert handle.graphs  # the handle itself is alive: only its weights died


def test_handles_come_oldest_first_and_once_each():
    model = nn.Linear(4, 4)
    first, second = _handle_over(model), _handle_over(model)
    second.add(CompiledGraph([], unmatched="again"), list(model.parameters()))
    assert handles_for(model) == [first, second]


def test_summary_of_a_never_compiled_twin_is_empty(capsys):

    compiled_model, twin = tiny(), tiny()
    compiled = compile_own(compiled_model, backend="cachedit", dynamic=False,
                             options={"cache_config": dict(Fn_compute_blocks=1, residual_diff_threshold=0.9,
                                                           max_warmup_steps=1), "inner": "eager"})
    euler(compiled, latent(), 4)
    assert [s.chain for s in cf.summary(compiled_model, logging=False)] == ["transformer_blocks[4]"]
    assert cf.summary(twin, logging=False) == []


@pytest.mark.parametrize("surface", ["backend", "enable_cache"])
def test_summary_describes_the_last_request_older_shapes_only_in_details(surface, capsys):
    """A request at a second resolution compiles a second graph: summary() describes the last request
    (that graph's row), the first resolution's row only with details=True."""
    model, cache = tiny(), dict(Fn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=1)
    if surface == "enable_cache":
        compiled = cf.enable_cache(model, cache_config=cache, inner="eager")
    else:
        compiled = compile_own(model, backend="cachedit", dynamic=False, options={"cache_config": cache,
                                                                                 "inner": "eager"})
    euler(compiled, latent(8), 6)
    cf.reset(model)
    euler(compiled, latent(12), 4)
    last = cf.summary(model, logging=True)
    assert [s.steps for s in last] == [4], [s.steps for s in last]
    assert capsys.readouterr().out.count("cached") == 1
    every = cf.summary(model, details=True, logging=True)
    assert sorted(s.steps for s in every) == [0, 4]  # the reset cleared the first resolution's request
    assert capsys.readouterr().out.count("steps;") == 2
    euler(compiled, latent(8), 3)  # back to the first resolution, no reset: a new request by its latent
    assert [s.steps for s in cf.summary(model, logging=False)] == [3]
