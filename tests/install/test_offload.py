"""Offloaded transformers (diffusers' group offload, accelerate's sequential offload), either install
order: the eager cache takes the decisions and image of the graph path on the unoffloaded one (its chain
across Flux's two block lists), and skipped blocks are not onloaded."""
from __future__ import annotations

import pytest
import torch

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

from tests.helpers.crossdit import CACHE

pytestmark = pytest.mark.slow


def _group_offload(pipe):
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)


def _sequential_offload(pipe):
    from accelerate import cpu_offload

    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def graph_cached_flux():
    """A zoo Flux request through the graph path without offload: the decisions and image to match."""
    from cachedit_fx import zoo

    pipe = zoo.build_pipeline("flux")
    cf.enable_cache(pipe, cache_config=CACHE, inner="eager")
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
def test_offloaded_blocks_cache_and_skipped_blocks_are_not_onloaded(offload, order, graph_cached_flux, monkeypatch):
    from cachedit_fx import zoo

    want, want_steps = graph_cached_flux
    pipe = zoo.build_pipeline("flux")
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    onloads, onloaded = [0] * len(blocks), [set() for _ in blocks]  # per block: onloads, modules onloaded
    hook_cls = _onload_hook(offload)
    original = hook_cls.pre_forward

    def counting(self, module, *args, **kwargs):
        if id(module) in owner:
            onloads[owner[id(module)]] += 1
            onloaded[owner[id(module)]].add(id(module))
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
    # Fn=1: block 0 is onloaded at every step, the middle blocks of both lists only at computed ones
    calls = [n // max(len(m), 1) for n, m in zip(onloads, onloaded)]  # a block's modules, once per call each
    assert calls == [8] + [8 - len(steps)] * (len(blocks) - 1), (calls, steps)
    cf.disable_cache(pipe)
