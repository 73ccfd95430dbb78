"""Compile counts: one Dynamo graph and one backend compile across requests of different step counts and
across handle.configure(), before and after the first call."""
from __future__ import annotations

import dataclasses

import pytest
from torch._dynamo.utils import counters

from cachedit_fx import zoo
from cachedit_fx.config import DBCacheConfig
from cachedit_fx.runtime.handle import CacheHandle

from tests.backend.families import THRESHOLD
from tests.backend.reference import graph_log
from tests.helpers.dynamo import compile_own


def _counting(inner_log: list):
    def inner(gm, example_inputs):
        inner_log.append(gm)
        return gm.forward
    return inner


@pytest.fixture(scope="module")
def sd3_counted():
    """sd3 compiled once (eager inner, counted). The options say threshold 0 (never cache), but
    handle.configure(threshold 0.35) runs before the first call, i.e. before the lazy compile: it must
    hold. Then three requests: 5 steps, 3 steps, and 4 steps after handle.configure(threshold 0)."""
    counters.clear()
    transformer, inputs = zoo.build_transformer("sd3")
    inner_log: list = []
    never = DBCacheConfig(Fn_compute_blocks=1, residual_diff_threshold=0.0, max_warmup_steps=2)
    handle = CacheHandle(never, None)
    opts = dict(cache_config=never, inner=_counting(inner_log), handle=handle)
    compiled = compile_own(transformer, backend="cachedit", options=opts, fullgraph=True, dynamic=False)
    handle.configure(dataclasses.replace(never, residual_diff_threshold=THRESHOLD["sd3"]))
    logs = []
    for steps, config in ((5, None), (3, None), (4, never)):
        if config is not None:
            handle.configure(config)
        _, outs = zoo.denoise(transformer, "sd3", inputs, num_steps=steps, call=compiled)
        chain = handle.chains[0]
        logs.append(dict(gates=graph_log(chain, "gate_log", 0, 6), cached=graph_log(chain, "cached_log", 0, 6)))
    stats = dict(unique_graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                 recompiles=dict(counters["recompiles"]), inner_compiles=len(inner_log), handle_graphs=len(handle.graphs))
    return stats, logs


def test_one_compile_for_different_step_counts(sd3_counted):
    stats, logs = sd3_counted
    assert stats["graph_breaks"] == 0, stats
    assert stats["unique_graphs"] == 1, stats
    assert stats["inner_compiles"] == 1, stats
    assert stats["handle_graphs"] == 1, stats
    # each request started over (auto-reset on the timestep jumping back up): warmup gates at steps 0, 1
    req1, req2 = logs[0], logs[1]
    assert req1["gates"][:5][:2] == [1, 1] and req1["gates"][5] == 0, req1
    assert any(req1["cached"][:5]), f"request 1 cached nothing: configure() before the compile was lost: {req1}"
    assert req2["gates"][:2] == [1, 1] and req2["gates"][3:] == [0, 0, 0], req2


def test_configure_changes_decisions_without_recompile(sd3_counted):
    stats, logs = sd3_counted
    assert stats["inner_compiles"] == 1 and stats["unique_graphs"] == 1, stats
    req3 = logs[2]
    # threshold 0 -> gate 6 ("threshold<=0") computes every step after warmup
    assert req3["gates"][:4] == [1, 1, 6, 6] and not any(req3["cached"][:4]), req3
