"""The model's own code inside the blocks: log calls and a first-call-only lookup still fit one graph, an
error the model raises propagates as it is, flex_attention blocks cache."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import cachedit_fx as cf
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.install.modes import Mode

from tests.helpers import tinydit
from tests.helpers.crossdit import CACHE, cached_steps, request
from tests.helpers.tinydit import cross_dit, uniform

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


def test_log_calls_fit_one_graph_after_dynamo_dropped_every_compile_callback():
    """``torch._dynamo.reset()`` clears Dynamo's compile callbacks, which is where the logger methods are
    added to the functions Dynamo ignores (capture/dynamo._LoggingIgnored): the next call adds them back."""
    model = _with_blocks(LoggingBlock)
    LoggingBlock.positions = {"x": 0, "ctx": 1}
    torch._dynamo.callback_handler.clear()
    cf.enable_cache(model, cache_config=CACHE, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        request(model, uniform(8))
    assert cache_hook(model).mode is Mode.ONE_GRAPH and cached_steps(model) > 0
    assert logging.Logger.warning not in torch._dynamo.config.ignore_logging_functions  # only while compiling
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
