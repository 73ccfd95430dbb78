"""Host reads: per step at most one per chain and branch (the cond's predicate), and none in the graph
the backend hands the inner compiler, or in its aten-level forward, outside the cond predicate."""
from __future__ import annotations

import pytest
import torch

from cachedit_fx import zoo

from tests.backend.families import FAMILIES, aot_config, family_results
from tests.backend.reference import branches_of, graph_log, uncond_inputs
from tests.helpers.host_reads import HOST_READS, CountHostReads, host_read_nodes

pytestmark = pytest.mark.slow


def measure_host_reads(name: str, steps: int = 6) -> dict:
    """Run the family's aot_eager graph directly (Dynamo refuses to run compiled frames under a
    dispatch mode) for a fresh request of ``steps`` steps, counting host reads per step."""
    r = family_results(name)
    key = aot_config(name)
    switch, transformer, inputs = r["switch"], r["transformer"], r["inputs"]
    run = switch.runs[key]
    if isinstance(run, Exception):
        raise run
    handle = run.cachedit_handle
    fam = zoo.get(name)
    uncond = uncond_inputs(name, transformer)
    handle.reset()
    per_step = []
    with torch.no_grad():
        for s in range(steps):
            t = torch.full_like(inputs[fam.timestep_arg], fam.timestep_max * (1 - s / steps))
            calls = [{**inputs, fam.timestep_arg: t}] + ([{**inputs, **uncond, fam.timestep_arg: t}] if uncond else [])
            with CountHostReads() as mode:
                for kw in calls:
                    run(*switch.flat_args(kw))
            per_step.append(dict(mode.ops))
    n_branches = branches_of(switch.configs[key])
    cached = [graph_log(c, "cached_log", b, steps) for c in handle.chains for b in range(n_branches)]
    return dict(per_step=per_step, reads=[_reads(d) for d in per_step], cached=cached,
                bound=len(handle.chains) * n_branches)


def _reads(ops: dict) -> int:
    return ops.get("cond_predicate", 0) + sum(ops.get(n, 0) for n in HOST_READS)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_host_reads_per_step(name):
    m = measure_host_reads(name)
    assert max(m["reads"]) <= m["bound"], (f"{name}: host reads per step {m['reads']} (ops {m['per_step']}) "
                                            f"exceed chains x branches = {m['bound']}")
    assert min(d.get("dispatched", 0) for d in m["per_step"]) > 50, f"the counting mode saw no ops: {m['per_step']}"
    cached = m["cached"]
    assert any(any(c) for c in cached) and not all(all(c) for c in cached), \
        f"want both cached and computed steps in the measured window: {cached}"


@pytest.mark.parametrize("name", FAMILIES)
def test_graph_has_no_host_reads_outside_cond(name):
    """The graph handed to the inner compiler, and its aten-level forward (cond branches included),
    read nothing on the host; the one read left is the cond's 0-dim bool predicate."""
    r = family_results(name)
    key = aot_config(name)
    if "error" in r[key]:
        raise r[key]["error"]
    graphs = r["switch"].graphs[key]
    n_chains = len(r[key]["handle"].chains)
    assert n_chains >= 1, r[key]["warnings"]
    assert len(graphs["dynamo"]) == 1 and len(graphs["aten"]) == 1, {k: len(v) for k, v in graphs.items()}
    for kind in ("dynamo", "aten"):
        gm = graphs[kind][0]
        assert not host_read_nodes(gm), f"{name}: the {kind} graph reads the host: {host_read_nodes(gm)}"
    aten = graphs["aten"][0]
    conds = [n for n in aten.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == n_chains, f"{name}: expected {n_chains} cond(s), one per chain, got {len(conds)}"
    for c in conds:
        pred = c.args[0].meta["val"]
        assert pred.dim() == 0 and pred.dtype == torch.bool, pred
