"""A request's later calls without Dynamo's frame (install/direct.py): the first call of a request per
call key goes through Dynamo, the later ones call the graph directly, with Dynamo's decisions and
outputs, and seeing what Dynamo's guards and sources would: a weight changed or re-assigned in the middle
of a request, a new input shape, a different global state, a forward with a side effect."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import cachedit_fx as cf
from cachedit_fx.install.direct import _binder_for, call_key
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.runtime.stats import collect

from tests.helpers.tinydit import TinyDiT, latent, request, tiny, uniform
from tests.install.test_owned_guards import COMPUTE_ALL, in_place, reassigned

CACHING = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.3, max_warmup_steps=1)
STEPS = uniform(6)


def installed(model=None, config=COMPUTE_ALL, **kw):
    model = tiny() if model is None else model
    plain = copy.deepcopy(model)
    cf.enable_cache(model, cache_config=config, compile=False, **kw)
    return model, plain


def direct_of(model):
    return cache_hook(model).graph.direct


def requests(model, n=2, x=None):
    outs = []
    for _ in range(n):
        cf.reset(model)
        outs += request(model, STEPS, latent() if x is None else x)
    return outs


def test_later_calls_skip_dynamo_with_its_decisions_and_outputs():
    fast, _ = installed(config=CACHING)
    through, _ = installed(config=CACHING)
    direct_of(through).lookup = lambda key, request: None  # every call through Dynamo
    got, want = requests(fast), requests(through)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    fast_stats, through_stats = collect(cache_hook(fast).handle), collect(cache_hook(through).handle)
    assert [s.cached for s in fast_stats] == [s.cached for s in through_stats]
    assert any(any(s.cached) for s in fast_stats)  # the comparison covers cached steps
    assert direct_of(fast).hits == 2 * (len(STEPS) - 1)  # all but each request's first call
    assert direct_of(through).hits == 0


def _step(model, x, t):
    with torch.no_grad():
        return model(x, torch.tensor([t]))


def test_a_weight_changed_or_reassigned_mid_request_is_read_by_the_next_direct_call():
    model, plain = installed()
    cf.reset(model)
    x = latent()
    for i, t in enumerate(STEPS):
        change = {2: in_place, 4: reassigned}.get(i)
        if change is not None:
            with torch.no_grad():
                change(model), change(plain)
        torch.testing.assert_close(_step(model, x, t), _step(plain, x, t), rtol=1e-5, atol=1e-5)
    assert direct_of(model).hits == len(STEPS) - 1


def test_a_new_shape_goes_through_dynamo_once_then_direct():
    model, plain = installed()
    cf.reset(model)
    direct = direct_of(model)
    for x, hits in ((latent(8), 0), (latent(8), 1), (latent(12), 1), (latent(12), 2), (latent(8), 3)):
        torch.testing.assert_close(_step(model, x, 0.5), _step(plain, x, 0.5), rtol=1e-5, atol=1e-5)
        assert direct.hits == hits


def test_another_global_state_or_a_function_mode_goes_through_dynamo():
    model, plain = installed()
    cf.reset(model)
    direct, x = direct_of(model), latent()
    _step(model, x, 0.9), _step(model, x, 0.8)
    assert direct.hits == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _step(model, x, 0.7), _step(plain, x, 0.7)
    assert got.dtype == want.dtype == torch.bfloat16 and direct.hits == 1
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    _step(model, x, 0.6)
    assert direct.hits == 1  # the plain state again: learned anew through Dynamo
    with torch.device("cpu"):  # a torch function mode, which Dynamo guards
        torch.testing.assert_close(_step(model, x, 0.5), _step(plain, x, 0.5), rtol=1e-5, atol=1e-5)
    assert direct.hits == 1
    _step(model, x, 0.4)
    assert direct.hits == 2


def test_each_request_starts_through_dynamo():
    model, _ = installed()
    requests(model, n=3)
    assert direct_of(model).hits == 3 * (len(STEPS) - 1)


WRITES: list = []


class Logging(TinyDiT):
    """A forward that appends to a module-level list: a write Dynamo's code replays after the graph."""

    def forward(self, hidden_states, timestep):
        WRITES.append(1)
        return super().forward(hidden_states, timestep)


def test_a_forward_with_a_side_effect_always_goes_through_dynamo():
    torch.manual_seed(0)
    model, _ = installed(Logging((("transformer_blocks", 4),)).eval())
    WRITES.clear()
    requests(model)
    assert len(WRITES) == 2 * len(STEPS)  # every call wrote (a direct call would not)
    assert direct_of(model).hits == 0


class ReturnsDict(TinyDiT):
    def forward(self, hidden_states, timestep, return_dict: bool = True):
        out = super().forward(hidden_states, timestep)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


@pytest.mark.parametrize("return_dict", [True, False])
def test_the_return_value_is_built_as_the_forward_builds_it(return_dict):
    torch.manual_seed(0)
    model, plain = installed(ReturnsDict((("transformer_blocks", 4),)).eval())
    cf.reset(model)
    x = latent()
    for t in STEPS[:3]:
        with torch.no_grad():
            got, want = model(x, torch.tensor([t]), return_dict=return_dict), \
                plain(x, torch.tensor([t]), return_dict=return_dict)
        assert type(got) is type(want)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert direct_of(model).hits == 2


def test_call_keys_tell_what_dynamo_s_input_guards_tell():
    x = torch.zeros(2, 3)
    base = call_key((x,), {"flag": True, "scale": 1.0, "extra": {"k": [1, None]}})
    others = [call_key((x.double(),), {"flag": True, "scale": 1.0, "extra": {"k": [1, None]}}),
              call_key((x.t(),), {"flag": True, "scale": 1.0, "extra": {"k": [1, None]}}),
              call_key((torch.zeros(3, 3),), {"flag": True, "scale": 1.0, "extra": {"k": [1, None]}}),
              call_key((x,), {"flag": 1, "scale": 1.0, "extra": {"k": [1, None]}}),  # int, not bool
              call_key((x,), {"flag": True, "scale": 2.0, "extra": {"k": [1, None]}}),
              call_key((x,), {"flag": True, "scale": 1.0, "extra": {"k": [2, None]}}),
              call_key((torch.zeros(2, 3, requires_grad=True),), {"flag": True, "scale": 1.0,
                                                                   "extra": {"k": [1, None]}})]
    assert None not in others and base not in others and len(set(others)) == len(others)
    assert call_key((torch.zeros(2, 3),), {"flag": True, "scale": 1.0, "extra": {"k": [1, None]}}) == base
    assert call_key((x, x), {}) is None  # one tensor passed twice
    assert call_key((object(),), {}) is None
    assert call_key(([[[[1]]]],), {}) is None  # deeper than described


def _signatures():
    def plain(a, b=2, *args, c, d=4, **kw):
        return locals()

    def positional(a, b=1, /, c=3):
        return locals()

    def keyword_only(self, *, x=None, y):
        return locals()

    def wrapper(self, *args, **kwargs):
        return locals()

    return [(plain, (1,), {"c": 3, "e": 5}), (plain, (1, 2, 9, 8), {"c": 0}), (positional, (1,), {}),
            (positional, (1, 5), {"c": 6}), (keyword_only, (0,), {"y": 1}), (wrapper, (0, 1), {"z": 2})]


@pytest.mark.parametrize("fn,args,kwargs", _signatures())
def test_the_binder_gives_the_frame_s_locals(fn, args, kwargs):
    assert _binder_for(fn)(*args, **kwargs) == fn(*args, **kwargs)


def test_the_binder_of_a_decorated_forward_binds_the_decorator_s_frame():
    def forward(self, hidden_states, timestep=None):
        return hidden_states

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):  # as diffusers' apply_lora_scale: the frame Dynamo compiles
        return locals()

    assert _binder_for(wrapper)(0, 1, timestep=2) == wrapper(0, 1, timestep=2)


def test_a_diffusers_forward_behind_its_lora_scale_decorator_is_called_directly():
    """Flux's forward is wrapped by diffusers' ``apply_lora_scale`` (``self, *args, **kwargs``): that
    wrapper's frame is the one Dynamo compiles, and the one the direct call rebinds."""
    from cachedit_fx import zoo

    transformer, inputs = zoo.build_transformer("flux")
    through = copy.deepcopy(transformer)
    outs = []
    for m in (transformer, through):
        cf.enable_cache(m, cache_config=CACHING, compile=False)
    direct_of(through).lookup = lambda key, request: None
    with torch.no_grad():
        for m in (transformer, through):
            cf.reset(m)
            outs.append([m(**inputs)[0] for _ in range(3)])
    for g, w in zip(*outs, strict=True):
        assert torch.equal(g, w)
    assert direct_of(transformer).hits == 2
