"""Teardown lives in the hook's ``deinitalize_hook``: diffusers' own ``registry.remove_hook("cachedit")``
(and ``disable_cache``, which calls it) undoes the islands and the eager wrappers and drops the graphs;
the module then runs exactly as before."""
from __future__ import annotations

import pytest
import torch

import cachedit_fx as cf
from cachedit_fx import zoo
from cachedit_fx.install.hook import HOOK_NAME, cache_hook

CACHE = dict(Fn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=1)


def _outputs(transformer, name, inputs):
    return zoo.denoise(transformer, name, inputs, num_steps=3)[1]


def _wrapped(transformer) -> list[str]:
    """Submodules that still carry an instance ``forward`` or an island mark."""
    return [name for name, m in transformer.named_modules()
            if "forward" in m.__dict__ or hasattr(m, "_cachedit_island")]


@pytest.mark.parametrize("name,eager", [("mochi", False), ("flux", True)], ids=["islands", "eager-cache"])
def test_remove_hook_through_diffusers_undoes_everything(name, eager):
    transformer, inputs = zoo.build_transformer(name)
    with torch.no_grad():
        plain = _outputs(transformer, name, inputs)
    cf.enable_cache(transformer, cache_config=CACHE, compile=False, eager=eager)
    _outputs(transformer, name, inputs)
    hook = cache_hook(transformer)
    assert _wrapped(transformer) and (hook.islands or hook.eager.cache is not None)
    transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=True)
    assert cache_hook(transformer) is None and not _wrapped(transformer)
    assert not hook.handle.graphs and not hook.islands and hook.eager.cache is None
    with torch.no_grad():
        after = _outputs(transformer, name, inputs)
    assert all(torch.equal(a, b) for a, b in zip(after, plain))
