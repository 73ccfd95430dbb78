"""What must never give a silently wrong or silently uncached image: request boundaries on a bare
transformer (found from the call's timestep and latent, whatever the timestep is called), Python-number
timesteps and a non-finite step under TaylorSeer. Each runs through enable_cache and the bare backend
(eager inner compiler, fast); the exported package's boundaries are in tests/export."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

from tests.helpers.crossdit import CACHE, CTX, cached_steps, request, same
from tests.helpers.dynamo import compile_own
from tests.helpers.tinydit import cross_dit, latent, tiny, uniform


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
        yield model, compile_own(model, backend="cachedit", dynamic=False,
                                 options=dict(cache_config=CACHE, inner="eager"))


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


def test_img2img_after_a_request_cancelled_at_twice_its_step(install):
    """8 steps cancelled at t=0.75, then img2img (strength 0.5) from t=0.5 with a freshly noised latent:
    the timestep moves on by exactly twice its last step, the latent jumps. No reset() between: the
    img2img request runs as on a fresh install, bit for bit."""
    model, call = install
    img2img = [0.5, 0.375, 0.25, 0.125]
    want = fresh(model, call, img2img, seed=5)
    assert cached_steps(model) > 0
    cf.reset(model)
    request(call, uniform(8)[:3], seed=3)
    assert same(request(call, img2img, seed=5), want)


def heun(call, steps, x):
    """FlowMatchHeunDiscrete's order of calls: t0, then each later timestep twice (the Euler guess and
    the corrected latent)."""
    t = uniform(steps) + [0.0]
    with torch.no_grad():
        v = call(x, CTX, torch.tensor([t[0]]))
        for i in range(steps - 1):
            dt = t[i + 1] - t[i]
            guess = call(x + dt * v, CTX, torch.tensor([t[i + 1]]))
            x = x + dt * (v + guess) / 2
            v = call(x, CTX, torch.tensor([t[i + 1]]))
    return x


def test_a_heun_request_is_one_request(install):
    """The corrector calls repeat the timestep with a latent a little off the guess: neither a new request
    nor a CFG pair; the request's steps all count in one state set."""
    model, call = install
    heun(call, 8, latent(12))
    (stats,) = [s for s in cf.summary(model, logging=False) if s.unmatched is None]
    assert len(stats.gates) == 15 and not stats.cfg_gates, (stats.gates, stats.cfg_gates)
    assert len(stats.cached_steps) > 0


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
    """``forward(x, ctx, t: float)``: a Python number timestep, embedded as a DiT embeds a tensor one
    (``uses``: how the forward reads the float besides)."""

    def __init__(self, uses: str = "tensor ops"):
        super().__init__()
        self.inner, self.uses = cross_dit(), uses

    def forward(self, x, ctx, t: float):
        scale = math.cos(t * 0.45 * math.pi) if self.uses == "math" else 1 + t
        return self.inner(x * scale, ctx, torch.full((1,), t))


class TensorTimestepDiT(nn.Module):
    """The same weights given the timestep as a tensor."""

    def __init__(self):
        super().__init__()
        self.inner = cross_dit()

    def forward(self, x, ctx, t):
        return self.inner(x * (1 + t), ctx, t)


def float_requests(call, tensor: bool = False) -> list[torch.Tensor]:
    """Two 8-step requests (an img2img one second, no reset between) of ``call(x, ctx, t)``."""
    outs = []
    with torch.no_grad():
        for timesteps, seed in ((uniform(8), 1), (uniform(4, 0.5), 5)):
            x = latent(12, seed)
            for t in timesteps:
                out = call(x, CTX, torch.tensor([t]) if tensor else t)
                outs.append(out)
                x = x - 0.1 * out
    return outs


def assert_within(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _cached(model) -> list[list[int]]:
    return [r.cached_steps for r in cf.summary(model, details=True, logging=False) if r.unmatched is None]


def _graphs(model) -> int:
    from cachedit_fx.install.api import cached_handles

    return sum(len(h.graphs) for _, h in cached_handles(model))


@pytest.mark.parametrize("surface", ["enable_cache", "enable_cache aot_eager", "backend"])
def test_a_python_float_timestep_caches_like_a_tensor_one(surface):
    """enable_cache passes the float as a 0-dim tensor; the bare backend (torch.compile's default
    dynamic=None) has Dynamo make it a graph input from the first call. One graph, found as the timestep
    by dataflow: the same cached steps and outputs as the model given a tensor timestep."""
    inner = "aot_eager" if "aot_eager" in surface else "eager"
    model, reference = FloatTimestepDiT().eval(), TensorTimestepDiT().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        if surface == "backend":
            got = float_requests(compile_own(model, backend="cachedit", options=dict(cache_config=CACHE, inner=inner)))
            want = float_requests(compile_own(reference, backend="cachedit", options=dict(cache_config=CACHE,
                                                                                      inner=inner)), tensor=True)
        else:
            for m in (model, reference):
                cf.enable_cache(m, cache_config=CACHE, inner=inner)
            got, want = float_requests(model), float_requests(reference, tensor=True)
    assert _graphs(model) == 1 and _cached(model) == _cached(reference) and _cached(model)[0], _cached(model)
    assert_within(got, want)


def test_a_float_timestep_the_forward_needs_as_a_float_runs_uncached_with_one_warning():
    """math.cos on the float: a tensor cannot stand in (a graph per value): uncached, one warning naming it."""
    model = FloatTimestepDiT("math").eval()
    want = float_requests(model)
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    with pytest.warns(UserWarning) as caught:
        got = float_requests(model)
    ours = [str(w.message) for w in caught if "cachedit" in str(w.message)]
    assert len(ours) == 1 and "takes 't' as a Python float" in ours[0] and "math.*" in ours[0], ours
    assert cache_hook(model).mode is Mode.UNCACHED
    assert_within(got, want)  # the calls before the drop ran on a float32 tensor: rounding, no more
    cf.disable_cache(model)


def test_a_float_timestep_dynamo_keeps_specialised_is_named_in_the_one_warning():
    """torch.compile(dynamic=False): Dynamo specialises the float (a graph per value); the backend cannot
    change that, so each graph runs uncached and one warning names the float (not "no timestep")."""
    model = FloatTimestepDiT().eval()
    want = float_requests(model)
    call = compile_own(model, backend="cachedit", dynamic=False, options=dict(cache_config=CACHE, inner="eager"))
    with pytest.warns(UserWarning) as caught:
        got = float_requests(call)
    ours = [str(w.message) for w in caught if "cachedit" in str(w.message)]
    assert len(ours) == 1 and "takes 't' as a Python float" in ours[0], ours
    assert _cached(model) == []
    assert_within(got, want)


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
        call = compile_own(model, backend="cachedit", dynamic=False,
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
