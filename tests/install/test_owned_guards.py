"""The guard-light one-graph compile (install/owned.py): the module's guards are dropped and its
fingerprint checked once per request, so a change made between requests — weights changed in place or
re-assigned, an adapter added or disabled, a hook registered — must still give the uncached result with
that change. Every request here computes every step (threshold 0): the outputs compare with the plain
model's own, made the same change."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.owned import OwnedGuards, fingerprint

from tests.helpers.tinydit import D, latent, request, tiny, uniform

COMPUTE_ALL = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.0, max_warmup_steps=0)
STEPS = uniform(3)


class LowRank(nn.Module):
    """A LoRA-style adapter around a linear layer, as peft's: the base plus B(A(x)) * scale unless
    ``disabled`` (a Python flag the forward reads, which the trace bakes in)."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 0.5):
        super().__init__()
        self.base, self.scale, self.disabled = base, scale, False
        self.down, self.up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features,
                                                                                        bias=False)
        torch.nn.init.normal_(self.up.weight)

    def forward(self, x):
        out = self.base(x)
        return out if self.disabled else out + self.up(self.down(x)) * self.scale


def installed(inner=None):
    """(cached model, plain twin): the twin receives the same changes and runs uncompiled."""
    model = tiny()
    plain = copy.deepcopy(model)
    kw = dict(compile=False) if inner is None else dict(inner=inner)
    cf.enable_cache(model, cache_config=COMPUTE_ALL, **kw)
    return model, plain


def both(model, plain, change):
    with torch.no_grad():
        change(model), change(plain)


def assert_request_matches(model, plain):
    cf.reset(model)  # a request boundary the host sees (a pipeline call marks one too)
    got = request(model, STEPS, latent())
    want = request(plain, STEPS, latent())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def in_place(m):
    m.proj_out.weight.mul_(-2.0)


def reassigned(m):
    m.transformer_blocks[2].mlp.weight = nn.Parameter(torch.ones_like(m.transformer_blocks[2].mlp.weight) / 7)


def adapter_added(m):
    torch.manual_seed(3)
    m.transformer_blocks[1].proj = LowRank(m.transformer_blocks[1].proj)


def adapter_disabled(m):
    m.transformer_blocks[1].proj.disabled = True


def adapter_scaled(m):
    m.transformer_blocks[1].proj.scale = 2.0


def hook_registered(m):
    m.proj_out.register_forward_hook(lambda mod, args, out: out * 0.5)


def test_light_only_after_a_request_was_marked():
    """An install called before any request was marked on the host keeps Dynamo's full guards."""
    marked, _ = installed()
    assert_request_matches(marked, copy.deepcopy(marked))
    assert cache_hook(marked).graph.owned.light
    unmarked, plain = installed()
    request(unmarked, STEPS, latent())
    assert not cache_hook(unmarked).graph.owned.light


def test_fingerprint_sees_structure_and_metadata_not_values():
    model = tiny()
    before = fingerprint(model)
    for change in (in_place, reassigned):  # the graph reads parameters off the module on every call
        with torch.no_grad():
            change(model)
        assert fingerprint(model) == before, change.__name__
    for change in (adapter_added, adapter_disabled, hook_registered):
        with torch.no_grad():
            change(model)
        after = fingerprint(model)
        assert after != before, change.__name__
        before = after
    model.transformer_blocks[2].mlp.weight = nn.Parameter(torch.zeros(3, 3))
    assert fingerprint(model) != before  # a new shape


def test_the_per_request_check_sees_writes_no_dict_records():
    """The check compares dict versions, list copies and tensor metadata before it computes a new
    fingerprint: a parameter's ``.data`` of a new shape, a list or a dict attribute changed in place."""
    model = tiny()
    model.transformer_blocks[0].merged = []  # as peft's merged_adapters
    model.transformer_blocks[0].scaling = {"style": 1.0}  # as peft's scaling
    changes = [lambda: setattr(model.proj_out.weight, "data", torch.zeros(D, 2 * D)),
               lambda: model.transformer_blocks[0].merged.append("style"),
               lambda: model.transformer_blocks[0].scaling.update(style=2.0)]
    handle = SimpleNamespace(requests=1)
    guards = OwnedGuards()
    assert guards.filter_for(handle) is not None
    guards.compiled(model, handle)
    for change in changes:
        assert not guards.stale(model, handle)  # same request: not checked
        handle.requests += 1
        assert not guards.stale(model, handle)  # a new request, nothing changed
        with torch.no_grad():
            change()
        handle.requests += 1
        assert guards.stale(model, handle)
        guards.compiled(model, handle)  # what a compile again records
    handle.requests += 1
    model.transformer_blocks[0].merged = ["style"]  # written, equal: no compile
    assert not guards.stale(model, handle)


@pytest.mark.slow
def test_changes_between_requests_give_the_uncached_result():
    model, plain = installed()
    assert_request_matches(model, plain)
    graph = cache_hook(model).graph
    compiled = graph.compiled
    for change in (in_place, reassigned):  # read off the module on every call: no compile
        both(model, plain, change)
        assert_request_matches(model, plain)
        assert graph.compiled is compiled, change.__name__
    for change in (adapter_added, adapter_disabled, adapter_scaled, hook_registered):  # compiled again
        both(model, plain, change)
        assert_request_matches(model, plain)
        assert graph.compiled is not compiled, change.__name__
        compiled = graph.compiled
    assert graph.owned.light


@pytest.mark.slow
@pytest.mark.parametrize("inner", [None, pytest.param("inductor", marks=pytest.mark.inductor)])
def test_peft_lora_add_and_disable(inner):
    peft = pytest.importorskip("peft")
    model, plain = installed(inner)
    assert_request_matches(model, plain)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "mlp"], init_lora_weights=False)
    models = []
    for m in (model, plain):
        torch.manual_seed(5)  # the same random adapter weights on both (init_lora_weights=False)
        models.append(peft.inject_adapter_in_model(config, m, adapter_name="style"))
    assert_request_matches(*models)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in models:
        for layer in m.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(False)
    assert_request_matches(*models)


@pytest.fixture(scope="module")
def inductor_install():
    return installed(inner="inductor")


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_in_place_reassigned_and_adapter(inductor_install):
    model, plain = inductor_install
    assert_request_matches(model, plain)
    for change in (in_place, reassigned, adapter_added, adapter_disabled):
        both(model, plain, change)
        assert_request_matches(model, plain)
    assert cache_hook(model).graph.owned.light


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_weights_changed_in_the_middle_of_a_request(inductor_install):
    """A request's later calls skip Dynamo's frame (install/direct.py) and still read the weights on
    every call: a change made between two steps shows in the next step's output."""
    model, plain = inductor_install
    cf.reset(model)
    direct = cache_hook(model).graph.direct
    hits, x = direct.hits, latent()
    for i, t in enumerate(STEPS + STEPS):
        change = {2: in_place, 4: reassigned}.get(i)
        if change is not None:
            both(model, plain, change)
        with torch.no_grad():
            got, want = model(x, torch.tensor([t])), plain(x, torch.tensor([t]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert direct.hits - hits == 2 * len(STEPS) - 1
