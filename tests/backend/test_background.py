"""``background_compile``: Inductor compiles in a child process while calls run the rewritten graph eagerly,
then the compiled graph takes over, loaded from the caches the child filled (backend/background.py); what
cannot go to a child compiles here, and a child that fails means a compile here with one warning."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import cachedit_fx as cf
from cachedit_fx.backend import background
from cachedit_fx.backend.options import parse_options
from cachedit_fx.errors import ConfigError
from cachedit_fx.install.hook import cache_hook

from tests.helpers.dynamo import compile_own
from tests.helpers.tinydit import D, euler, latent, tiny

CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.2, max_warmup_steps=1,
             enable_separate_cfg=False)


@pytest.fixture
def own_cache_dir(tmp_path, monkeypatch):
    """An empty Inductor cache the child and this process share."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_background_compile_needs_inductor_and_a_bool():
    with pytest.raises(ConfigError, match=r"background_compile=True needs inner='inductor'.*'aot_eager'"):
        parse_options(dict(inner="aot_eager", background_compile=True))
    with pytest.raises(ConfigError, match="background_compile must be True or False, got 'yes'"):
        parse_options(dict(background_compile="yes"))
    with pytest.raises(ConfigError, match="background_compile=True needs inner='inductor'.*'eager'"):
        cf.enable_cache(tiny(("blocks", 4)), inner="eager", background_compile=True)
    with pytest.raises(ConfigError, match="background_compile=True needs compile=True"):
        cf.enable_cache(tiny(("blocks", 4)), compile=False, background_compile=True)
    assert parse_options(dict(background_compile=True)).background_compile


def test_what_compiles_here_and_why():
    x = torch.randn(2, 3)
    plain = torch.fx.symbolic_trace(nn.Linear(3, 3))
    with torch.no_grad():
        assert background.why_not(plain, [x, nn.Parameter(x)]) is None
        assert "view into a larger storage" in background.why_not(plain, [x[1:]])
        size = ShapeEnv().create_unbacked_symint()
        assert background.why_not(plain, [x, size]).startswith("its sizes are dynamic")
        island = torch.fx.Graph()
        island.output(island.call_function(torch.ops.cachedit.island.default, (0, 0, [island.placeholder("x")])))
        assert "islands" in background.why_not(torch.fx.GraphModule(nn.Module(), island), [x])
    assert background.why_not(plain, [x]) == "grad mode is on"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)).eval()


def _calls(compiled, x, n):
    with torch.no_grad():
        return [compiled(x) for _ in range(n)]


def test_a_graph_runs_eagerly_until_the_child_is_done_then_compiled(own_cache_dir):
    """A graph with no chain (compiled uncached, with its warning) takes the same way as a cached one."""
    model, x = _mlp(), latent()
    compiled = compile_own(model, backend="cachedit", options=dict(background_compile=True))
    with pytest.warns(UserWarning, match="caching disabled"):
        (first,) = _calls(compiled, x, 1)
    (job,) = cf.background_compiles(model)
    assert (job.status, job.eager_calls, job.compiled_calls) == ("compiling", 1, 0)
    job.wait(timeout=600)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = _calls(compiled, x, 3)
    assert not [w for w in caught if "cachedit" in str(w.message)]  # the switch found the child's result
    assert (job.status, job.eager_calls, job.compiled_calls) == ("compiled", 1, 3)
    with torch.no_grad():
        expected = model(x)
    for out in [first, *outs]:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _after_failed_child(monkeypatch, child_code: str):
    """The MLP compiled with a child that runs ``child_code`` instead of compiling: (the model, its input, the
    job, the outputs of three calls after the child exited, the cachedit warnings those calls gave)."""
    monkeypatch.setattr(background, "CHILD", [sys.executable, "-c", child_code])
    model, x = _mlp(), latent()
    compiled = compile_own(model, backend="cachedit", options=dict(background_compile=True))
    with pytest.warns(UserWarning, match="caching disabled"):
        _calls(compiled, x, 1)
    (job,) = cf.background_compiles(model)
    job.wait(timeout=60)
    with pytest.warns(UserWarning) as caught:
        outs = _calls(compiled, x, 3)
    return model, x, job, outs, [str(w.message) for w in caught if "cachedit" in str(w.message)]


def test_a_failed_child_means_a_compile_here_with_one_warning(own_cache_dir, monkeypatch):
    model, x, job, outs, warned = _after_failed_child(monkeypatch, "import sys; print('no compiler'); sys.exit(3)")
    assert warned == ["cachedit: background compile: the child process failed (exit 3): no compiler"]
    assert job.compiled_calls == 3
    with torch.no_grad():
        torch.testing.assert_close(outs[-1], model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [4, 8])
def test_enable_cache_caches_the_same_steps_eagerly_and_compiled(own_cache_dir, blocks):
    """The decisions and outputs of a request served by the graph the child compiled equal a request of the
    rewritten graph run eagerly (compile=False); at 8 blocks the middle ones are region calls."""
    def request(**kw):
        model = tiny(("transformer_blocks", blocks))
        cf.enable_cache(model, **CACHE, **kw)
        return model

    reference = request(compile=False)
    expected = euler(reference, latent(), 8)
    model = request(background_compile=True)
    with torch.no_grad():
        model(latent(), torch.tensor([1.0]))  # the first call starts the child
    (job,) = cf.background_compiles(model)
    job.wait(timeout=900)
    cf.reset(model)
    outs = euler(model, latent(), 8)
    assert job.status == "compiled" and job.compiled_calls == 8
    assert len(cache_hook(model).graph.regions) == (blocks if blocks == 8 else 0)
    assert [r.cached_steps for r in cf.summary(model, logging=False)] == \
        [r.cached_steps for r in cf.summary(reference, logging=False)]
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inductor_failing_here_too_leaves_the_graph_running_eagerly_with_one_warning(own_cache_dir, monkeypatch):
    def broken(self):
        raise RuntimeError("no lowering")

    monkeypatch.setattr(background.Payload, "compile", broken)
    model, x, job, outs, warned = _after_failed_child(monkeypatch, "import sys; sys.exit(1)")
    assert warned == ["cachedit: background compile: Inductor failed on the graph (RuntimeError: no lowering); it "
                      "keeps running eagerly"]
    assert (job.eager_calls, job.compiled_calls) == (4, 0)
    with torch.no_grad():
        torch.testing.assert_close(outs[-1], model(x), rtol=0, atol=0)
