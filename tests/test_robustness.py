"""What must never give a silently wrong or silently uncached image: request boundaries on a bare
transformer (found from the call's timestep and latent, whatever the timestep is called), Python-number
timesteps, a non-finite step under TaylorSeer, a torch.compile on top of enable_cache, and configs that
do not fit. Each runs through enable_cache and the bare backend (eager inner compiler, fast); the
exported package's boundaries are in test_export."""
from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

import tinydit
from tinydit import cross_dit, latent, tiny, uniform

CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.9, max_warmup_steps=2)
CTX = latent(5, seed=2)


def request(model, timesteps, seed=1, x=None):
    return tinydit.request(model, timesteps, latent(12, seed) if x is None else x, CTX)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def cached_steps(model) -> int:
    return sum(len(r.cached_steps) for r in cf.summary(model, details=True, logging=False) if r.unmatched is None)


@pytest.fixture(params=["enable_cache", "backend"])
def install(request):
    """(model, callable) for a cross_dit whose timestep is called ``noise_level``: under enable_cache,
    or compiled by the bare backend."""
    model = cross_dit()
    if request.param == "enable_cache":
        cf.enable_cache(model, cache_config=CACHE, compile=False)
        yield model, model
        cf.disable_cache(model)
    else:
        torch._dynamo.reset()
        yield model, torch.compile(model, backend="cachedit", dynamic=False,
                                   options=dict(cache_config=CACHE, inner="eager"))
        torch._dynamo.reset()


def fresh(model, call, timesteps, **kw):
    """The request as a fresh install would run it: after a reset."""
    cf.reset(model)
    return request(call, timesteps, **kw)


def test_a_timestep_called_noise_level_starts_each_request_afresh(install):
    model, call = install
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a timestep is found: no warning
        first = request(call, uniform(8))
        second = request(call, uniform(8))
    assert cached_steps(model) > 0
    assert same(first, second)


def test_a_warm_up_call_then_the_request(install):
    """A compile warm-up with a dummy latent at the request's first timestep: not a CFG pair's first
    half, and its residual is no reference for the request."""
    model, call = install
    want = fresh(model, call, uniform(8))
    cf.reset(model)
    request(call, [1.0], seed=9)
    got = request(call, uniform(8))
    assert cached_steps(model) > 0
    assert same(got, want)


def test_a_request_abandoned_after_one_call(install):
    model, call = install
    want = fresh(model, call, uniform(8))
    cf.reset(model)
    request(call, uniform(8)[:1], seed=7)
    assert same(request(call, uniform(8)), want)


def test_img2img_after_a_cancelled_request(install):
    """Cancelled at t=0.75, then an img2img request from t=0.5: its steps count from 0 (warm-up again)."""
    model, call = install
    img2img = [0.5 - 0.0625 * i for i in range(8)]
    want = fresh(model, call, img2img, seed=5)
    cf.reset(model)
    request(call, [1.0, 0.9375, 0.875, 0.8125, 0.75], seed=3)
    assert same(request(call, img2img, seed=5), want)


def test_no_timestep_warns_once_and_names_reset():
    """A transformer that takes no timestep tensor: nothing tells requests apart; one warning says so."""
    class Untimed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny()

        def forward(self, hidden_states):
            return self.inner(hidden_states, torch.ones(1))

    model = Untimed().eval()
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    with pytest.warns(UserWarning) as caught, torch.no_grad():
        for _ in range(2):
            for i in range(4):
                model(latent(seed=i))
    ours = [str(w.message) for w in caught if "no timestep" in str(w.message)]
    assert len(ours) == 1 and "cachedit_fx.reset(model)" in ours[0] and "num_inference_steps" in ours[0]
    cf.disable_cache(model)
    # a step count tells requests apart: no warning
    cf.enable_cache(model, cache_config=dict(CACHE, num_inference_steps=4), compile=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        model(latent())
    cf.disable_cache(model)


class FloatTimestepDiT(nn.Module):
    """``forward(x, t: float)``: a Python number timestep."""

    def __init__(self):
        super().__init__()
        self.inner = tiny()

    def forward(self, hidden_states, t: float):
        return self.inner(hidden_states * (1 + t), torch.full((1,), t))


def test_a_python_float_timestep_runs_uncached_with_one_warning():
    torch.manual_seed(0)
    model = FloatTimestepDiT().eval()
    x = latent()
    with torch.no_grad():
        want = [model(x, t) for t in uniform(6) * 2]
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    with pytest.warns(UserWarning) as caught, torch.no_grad():
        got = [model(x, t) for t in uniform(6) * 2]
    ours = [str(w.message) for w in caught if "cachedit" in str(w.message)]
    assert len(ours) == 1 and "Python float ('t')" in ours[0]
    assert "torch.tensor([t])" in ours[0]
    assert cache_hook(model).mode is Mode.UNCACHED
    assert same(got, want)
    cf.disable_cache(model)


def test_a_float_that_changes_per_request_keeps_caching():
    """A float argument fixed within a request (here a scale) is no timestep: one graph per value, cached."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny()

        def forward(self, hidden_states, timestep, scale: float = 1.0):
            return self.inner(hidden_states * scale, timestep)

    model = Scaled().eval()
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    with torch.no_grad():
        for scale in (1.0, 0.5, 2.0):
            x = latent()
            for t in uniform(6):
                x = x - 0.1 * model(x, torch.tensor([t]), scale=scale)
    assert cache_hook(model).mode is Mode.ONE_GRAPH
    assert cached_steps(model) > 0
    cf.disable_cache(model)


@pytest.mark.parametrize("surface", ["enable_cache", "backend"])
def test_a_nan_step_with_taylorseer_recovers(surface):
    """A NaN latent at one step: that step's output is NaN (as uncached), every later one is finite,
    and later steps cache again."""
    model = cross_dit()
    calib = dict(enable_calibrator=True, taylorseer_order=1)
    config = dict(CACHE, residual_diff_threshold=0.95)
    if surface == "enable_cache":
        cf.enable_cache(model, cache_config=config, calibrator_config=calib, compile=False)
        call = model
    else:
        torch._dynamo.reset()
        call = torch.compile(model, backend="cachedit", dynamic=False,
                             options=dict(cache_config=config, calibrator_config=calib, inner="eager"))
    timesteps, outs = uniform(14), []
    x = latent(12)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            inp = torch.full_like(x, math.nan) if i == 6 else x
            out = call(inp, CTX, torch.tensor([t]))
            outs.append(out)
            x = x - 0.1 * torch.nan_to_num(out)
    assert torch.isnan(outs[6]).all()
    assert all(torch.isfinite(o).all() for o in outs[7:])
    log = [r for r in cf.summary(model, details=True, logging=False) if r.unmatched is None][0]
    assert 7 not in log.cached_steps and any(s > 7 for s in log.cached_steps)
    if surface == "enable_cache":
        cf.disable_cache(model)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- compile on top


@pytest.fixture
def installed():
    model = cross_dit()
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    want = request(model, uniform(8))
    cf.reset(model)
    yield model, want
    cf.disable_cache(model)
    torch._dynamo.reset()


def test_torch_compile_on_top_of_enable_cache_caches(installed):
    model, want = installed
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    assert same(request(compiled, uniform(8)), want)
    assert cached_steps(model) > 0


def test_module_compile_on_top_of_enable_cache_caches(installed):
    model, want = installed
    torch._dynamo.reset()
    model.compile(backend="eager")
    assert same(request(model, uniform(8)), want)
    assert cached_steps(model) > 0


def test_fullgraph_compile_on_top_of_enable_cache_says_what_to_do(installed):
    model, _ = installed
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


# ----------------------------------------------------------------------------- offload


def _group_offload(pipe):
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)


def _sequential_offload(pipe):
    from accelerate import cpu_offload

    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def eager_cached_flux():
    """A zoo Flux request through the eager cache without offload: the decisions and image to match."""
    from cachedit_fx import zoo

    pipe = zoo.build_pipeline("flux")
    cf.enable_cache(pipe, cache_config=CACHE, eager=True)
    out = zoo.run_pipeline(pipe, "flux", num_inference_steps=8)
    steps = cf.summary(pipe, details=True, logging=False)[0].cached_steps
    cf.disable_cache(pipe)
    return out, steps


def _onload_hook(offload):
    """The hook class whose ``pre_forward`` moves a module's weights onto the device."""
    if offload is _group_offload:
        from diffusers.hooks.group_offloading import GroupOffloadingHook
        return GroupOffloadingHook
    from accelerate.hooks import AlignDevicesHook
    return AlignDevicesHook


@pytest.mark.parametrize("offload", [_group_offload, _sequential_offload], ids=["group", "sequential"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_offloaded_blocks_cache_and_skipped_blocks_are_not_onloaded(offload, order, eager_cached_flux, monkeypatch):
    from cachedit_fx import zoo

    want, want_steps = eager_cached_flux
    pipe = zoo.build_pipeline("flux")
    blocks = pipe.transformer.transformer_blocks
    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    onloads = [0] * len(blocks)
    hook_cls = _onload_hook(offload)
    original = hook_cls.pre_forward

    def counting(self, module, *args, **kwargs):
        if id(module) in owner:
            onloads[owner[id(module)]] += 1
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(hook_cls, "pre_forward", counting)
    if order == "before":
        offload(pipe)
    cf.enable_cache(pipe, cache_config=CACHE)
    if order == "after":
        offload(pipe)
    with pytest.warns(UserWarning) as caught:
        out = zoo.run_pipeline(pipe, "flux", num_inference_steps=8)
    ours = [str(w.message) for w in caught if "cachedit" in str(w.message)]
    assert len(ours) == 1 and "offload" in ours[0], ours
    assert cache_hook(pipe.transformer).mode is Mode.EAGER
    steps = cf.summary(pipe, details=True, logging=False)[0].cached_steps
    assert steps == want_steps and len(steps) > 0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Fn=1: block 0 is onloaded at every step, the middle blocks only at computed ones
    assert onloads[0] > 0, onloads
    assert all(n * 8 == onloads[0] * (8 - len(steps)) for n in onloads[1:]), (onloads, steps)
    cf.disable_cache(pipe)


# ----------------------------------------------------------------------------- the model's own code


_LOG = logging.getLogger("cachedit_fx.tests")


class LoggingBlock(tinydit.CrossBlock):
    """A block as diffusers' context-parallel hooks are written: a log call in the forward, and a lookup
    Dynamo cannot trace (there: ``inspect.signature`` of the block class) on the first call only, its
    result kept for the later calls."""
    positions: dict | None = None

    def forward(self, x, ctx):
        if LoggingBlock.positions is None:
            torch._dynamo.graph_break()  # stands in for the untraceable lookup
            LoggingBlock.positions = {"x": 0, "ctx": 1}
        _LOG.warning("block called with %d tokens", x.shape[1])
        return super().forward(x, ctx)


class RaisingBlock(tinydit.CrossBlock):
    def forward(self, x, ctx):
        raise ValueError("this attention needs a GPU")


def _with_blocks(block_class):
    model = cross_dit()
    torch.manual_seed(0)
    model.layers = nn.ModuleList(block_class() for _ in range(4))
    return model.eval()


def test_log_calls_and_a_first_call_only_lookup_still_fit_one_graph():
    model = _with_blocks(LoggingBlock)
    want = request(model, uniform(8))
    LoggingBlock.positions = None  # the cached install's first call takes the lookup path
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = request(model, uniform(8))
    assert cache_hook(model).mode is Mode.ONE_GRAPH and cached_steps(model) > 0
    assert torch.allclose(got[1], want[1], atol=1e-6)  # a computed step equals the uncached one
    cf.disable_cache(model)


def test_an_error_the_model_raises_in_a_block_propagates_as_it_is():
    model = _with_blocks(RaisingBlock)
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    with pytest.raises(ValueError, match="this attention needs a GPU"):
        request(model, uniform(2))
    assert not cache_hook(model).islands  # no island was made of the raising attention
    cf.disable_cache(model)


class FlexBlock(nn.Module):
    """Self-attention through flex_attention with a score_mod: the higher-order op's subgraph is a
    get_attr between the block's nodes."""

    def __init__(self):
        super().__init__()
        self.qkv, self.mlp = nn.Linear(tinydit.D, 3 * tinydit.D), nn.Linear(tinydit.D, tinydit.D)

    def forward(self, x, ctx):
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        x = x + flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s - 0.1 * (i - j).abs()).squeeze(1)
        return x + self.mlp(x)


def test_flex_attention_blocks_cache_and_a_computed_step_is_exact():
    model = _with_blocks(FlexBlock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's "called without torch.compile" note, uncached
        want = request(model, uniform(8))
        cf.enable_cache(model, cache_config=CACHE, compile=False)
        got = request(model, uniform(8))
    assert cache_hook(model).mode is Mode.ONE_GRAPH and cached_steps(model) > 0
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    cf.disable_cache(model)
