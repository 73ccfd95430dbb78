"""Inductor as the inner compiler (one case, Flux DBCache): decisions and outputs equal the oracle's, the
cached graph checks no sizes again, and inner options override the cached graph's defaults."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from cachedit_fx import zoo
from cachedit_fx.backend.inner import CACHED_GRAPH_INDUCTOR_OPTIONS, inner_compile
from cachedit_fx.runtime.handle import handles_for

from tests.backend.families import THRESHOLD
from tests.backend.reference import STEPS, compare_with_oracle, reference_run
from tests.helpers.dynamo import compile_own


@pytest.fixture(scope="module")
def inductor_flux():
    transformer, inputs = zoo.build_transformer("flux")
    opts = dict(cache_config=dict(Fn_compute_blocks=1, residual_diff_threshold=THRESHOLD["flux"],
                                  max_warmup_steps=2), inner="inductor")
    compiled = compile_own(transformer, backend="cachedit", options=opts, fullgraph=True, dynamic=False)
    (_, outs), code = run_and_get_code(lambda: zoo.denoise(transformer, "flux", inputs, num_steps=STEPS,
                                                           call=compiled))
    handle = [h for h in handles_for(transformer) if h.chains][-1]
    ref_outs, oracle = reference_run("flux", transformer, inputs, handle.chains[0], opts)
    return handle, outs, ref_outs, oracle, code


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_flux_dbcache_matches_oracle(inductor_flux):
    handle, outs, ref_outs, oracle, _ = inductor_flux
    assert compare_with_oracle(handle.chains[0], oracle, outs, ref_outs) > 0


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_cached_graph_has_no_size_asserts(inductor_flux):
    """Dynamo's guards check the inputs' sizes and strides: the rewritten graph does not check them
    again on every call (and its branches not a third time)."""
    *_, code = inductor_flux
    assert len(code) == 1 and "def true_graph_0" in code[0] and "def false_graph_0" in code[0]
    assert "assert_size_stride(" not in code[0]


def test_inner_options_override_the_cached_graph_defaults(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    seen = []
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches=None: seen.append(
        config_patches))
    inner_compile(None, [], "inductor", None, CACHED_GRAPH_INDUCTOR_OPTIONS)
    inner_compile(None, [], "inductor", {"size_asserts": True, "max_autotune": True}, CACHED_GRAPH_INDUCTOR_OPTIONS)
    inner_compile(None, [], "inductor", None)  # an uncached graph keeps Inductor's own defaults
    cond_cacheable = CACHED_GRAPH_INDUCTOR_OPTIONS["unsafe_marked_cacheable_functions"]
    assert seen == [{"size_asserts": False, "unsafe_marked_cacheable_functions": cond_cacheable},
                    {"size_asserts": True, "max_autotune": True, "unsafe_marked_cacheable_functions": cond_cacheable},
                    None]
    assert cond_cacheable == {"torch.ops.higher_order.cond": torch.__version__}
