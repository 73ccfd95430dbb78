"""The install's CacheHook on a tiny hand-written DiT (eager inner compiler, fast): its modes and what
diffusers' hook machinery tells it (cache_context, reset_state), errors that propagate unchanged, configs
that do not fit, and the compile log lines."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

from tests.helpers.tinydit import D, euler, latent, tiny

CACHE = dict(Fn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=1)
TWO_CHAINS = (("blocks", 4), ("late_blocks", 3))


def x0():
    return latent()


def denoise(model, steps=6, context=None):
    """The outputs of one request; every call inside ``cache_context(context)`` when given."""
    def call(x, t):
        with model.cache_context(context) if context else contextlib.nullcontext():
            return model(x, t)
    return euler(call, latent(), steps)


def same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@contextlib.contextmanager
def cached(model, **changes):
    """The model under enable_cache (eager inner) for the block; its hook."""
    cf.enable_cache(model, cache_config={**CACHE, **changes}, compile=False)
    try:
        yield cache_hook(model)
    finally:
        cf.disable_cache(model)


def rows_of(model):
    return [r for r in cf.summary(model, details=True) if r.unmatched is None]


def test_modes_grad_then_one_graph_then_uninstall():
    model = tiny()
    ref = denoise(model)
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    hook = cache_hook(model)
    assert hook.mode is Mode.NOT_COMPILED and model._diffusers_hook.get_hook("cachedit") is hook
    with pytest.warns(UserWarning, match="grad mode is on"):
        model(x0(), torch.tensor([1.0]))
    assert hook.mode is Mode.GRAD and not hook.handle.chains
    out = denoise(model)
    assert hook.mode is Mode.ONE_GRAPH and len(hook.handle.chains) == 1
    assert rows_of(model)[0].cached_steps and not same(out, ref)
    cf.disable_cache(model)
    assert cache_hook(model) is None and "forward" not in model.__dict__
    assert same(denoise(model), ref)


def test_cache_context_reaches_the_hook():
    """diffusers' cache_context sets the hook's StateManager: every call named "uncond" goes to branch 1."""
    model = tiny()
    with cached(model, enable_separate_cfg=True) as hook:
        denoise(model, context="uncond")
        used = [(r.steps, r.cfg_steps) for r in rows_of(model)]
        assert used == [(0, 6)], used
        assert hook.context.current is None  # cleared after each call


def test_diffusers_reset_state_starts_the_next_call_afresh():
    model = tiny()
    with cached(model):
        denoise(model)
        model._reset_stateful_cache()  # what a pipeline's maybe_free_model_hooks calls at its end
        assert rows_of(model)[0].steps == 6  # the request that ended stays readable
        with torch.no_grad():
            model(x0(), torch.tensor([0.5]))
        assert rows_of(model)[0].steps == 1


def test_a_model_error_propagates_without_a_second_compile():
    model = tiny()
    with cached(model) as hook:
        with torch.no_grad(), pytest.raises(RuntimeError, match="same reduction dim"):
            model(torch.randn(1, 8, D + 1), torch.tensor([1.0]))  # the model's own shape error
        assert hook.mode is Mode.NOT_COMPILED and not hook.handle.graphs  # no compile with breaks tried


def test_fn_bn_that_do_not_fit_raise_the_config_error_itself():
    """Longer than all block lists together: at enable_cache. Longer than the chain (4 of 7 blocks): at the
    first call, and again at the next without a second compile."""
    with pytest.raises(cf.ConfigError, match=r"Fn_compute_blocks=5, Bn_compute_blocks=3: TinyDiT has 7 blocks"):
        cf.enable_cache(tiny(*TWO_CHAINS), cache_config=dict(CACHE, Fn_compute_blocks=5, Bn_compute_blocks=3))
    model = tiny(*TWO_CHAINS)
    with cached(model, Fn_compute_blocks=3, Bn_compute_blocks=2) as hook:
        for _ in range(2):
            with torch.no_grad(), pytest.raises(cf.ConfigError, match=r"do not fit chain blocks\[4\] of 4 blocks"):
                model(x0(), torch.tensor([1.0]))
        assert hook.mode is Mode.NOT_COMPILED


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_first_compile_logs_start_and_duration_at_diffusers_verbosity():
    log = logging.getLogger("diffusers.cachedit_fx")
    records = _Records()
    log.addHandler(records)
    before = diffusers_logging.get_verbosity()
    try:
        for verbosity in (logging.WARNING, logging.INFO):
            diffusers_logging.set_verbosity(verbosity)
            model = tiny()
            with cached(model):
                denoise(model, steps=2)
            if verbosity == logging.WARNING:
                assert records.messages == []
    finally:
        diffusers_logging.set_verbosity(before)
        log.removeHandler(records)
    assert len(records.messages) == 2, records.messages
    assert "compiling TinyDiT on its first call" in records.messages[0]
    assert "TinyDiT compiled in" in records.messages[1] and "one graph" in records.messages[1]
