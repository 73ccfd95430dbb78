"""DBPrune against cache-dit 1.5.3 itself: the same tiny model, config and inputs give the same pruned steps,
the same pruned blocks per call, the same recorded diffs per block and the same outputs (within 1e-5
relative), over two requests with a ``refresh_context`` between (the second with another threshold).

The tiny Flux (its 4 double + 4 single blocks are one chain of 8 for both), a hand-written DiT of one list
(pattern 3) and one with a text stream (pattern 1) through cache-dit's BlockAdapter, on the graph path and
the eager cache; and the tiny Flux compiled with aot_eager, where the same script gives one graph, no
break, no recompile across requests, and one host read per prunable block per call (each block's cond
predicate, nothing else). Skipped without cache-dit (``pip install --no-deps cache-dit==1.5.3``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch._dynamo.utils import counters

import cachedit_fx
from cachedit_fx import zoo
from cachedit_fx.install.hook import cache_hook

from tests.helpers.differential import assert_outputs_within, flux_with_uncond, import_cache_dit
from tests.helpers.host_reads import CountHostReads, host_read_nodes
from tests.helpers.tinydit import euler, joint_dit, latent, tiny

reference = import_cache_dit()

STEPS = 8


@dataclass
class Request:
    """One request's DBPrune statistics (cache-dit's names; ``cfg_``: the CFG branch) and outputs."""

    pruned_steps: list[int]
    pruned_blocks: list[int]
    cfg_pruned_steps: list[int]
    cfg_pruned_blocks: list[int]
    diffs: dict[str, list[float]]
    cfg_diffs: dict[str, list[float]]
    pruned_ratio: float | None
    tag: str  # strify(model)
    outputs: list[torch.Tensor] = field(default_factory=list)


def _stats(lib, model) -> tuple:
    if lib is reference:
        ctx = model._context_manager.get_context(model._context_names[-1])
        ratio = sum(ctx.pruned_blocks) / sum(ctx.actual_blocks) if ctx.pruned_blocks else None
        return (ctx.cached_steps, ctx.pruned_blocks, ctx.cfg_cached_steps, ctx.cfg_pruned_blocks, ctx.residual_diffs,
                ctx.cfg_residual_diffs, ratio)
    s, = [s for s in lib.summary(model, logging=False) if s.unmatched is None]
    return (s.pruned_steps, s.pruned_blocks, s.cfg_pruned_steps, s.cfg_pruned_blocks, s.residual_diffs,
            s.cfg_residual_diffs, s.pruned_ratio)


def run_requests(lib, model, loop, cache: dict, second: dict, target=None, **kwargs) -> list[Request]:
    """Two requests through ``lib``: enable_cache(DBPruneConfig(**cache)), run, refresh_context(**second), run."""
    lib.enable_cache(target if target is not None else model, cache_config=lib.DBPruneConfig(**cache), **kwargs)
    requests = []
    for r in range(2):
        if r:
            lib.refresh_context(model, **second)
        outputs = loop(model)
        stats = [copy.deepcopy(x) for x in _stats(lib, model)]
        requests.append(Request(*stats, lib.strify(model), outputs=outputs))
    return requests


def assert_same(theirs: list[Request], ours: list[Request]) -> None:
    for r, (t, o) in enumerate(zip(theirs, ours)):
        where = f"request {r}"
        for name in ("pruned_steps", "pruned_blocks", "cfg_pruned_steps", "cfg_pruned_blocks"):
            assert getattr(o, name) == getattr(t, name), f"{where}: {name}, cache-dit {getattr(t, name)}, ours " \
                                                         f"{getattr(o, name)}"
        assert (o.pruned_ratio is None) == (t.pruned_ratio is None) and \
            (t.pruned_ratio is None or abs(o.pruned_ratio - t.pruned_ratio) < 1e-12), (o.pruned_ratio, t.pruned_ratio)
        assert o.tag == t.tag, f"{where}: strify, cache-dit {t.tag}, ours {o.tag}"
        for mine, their, what in ((o.diffs, t.diffs, "diffs"), (o.cfg_diffs, t.cfg_diffs, "CFG diffs")):
            assert sorted(mine) == sorted(their), f"{where}: {what} at steps {sorted(their)} (cache-dit), {sorted(mine)}"
            for step, values in their.items():
                assert len(mine[step]) == len(values), (where, what, step, mine[step], values)
                for a, b in zip(mine[step], values):
                    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (where, what, step, mine[step], values)
        assert_outputs_within(o.outputs, t.outputs, where)
    assert any(r.pruned_steps or r.cfg_pruned_steps for r in theirs), "nothing pruned: the case tests nothing"


# ----------------------------------------------------------------------------- Flux


@pytest.fixture(scope="module")
def flux():
    return flux_with_uncond()


B = dict(Fn_compute_blocks=1, Bn_compute_blocks=0)
DYN = dict(enable_dynamic_prune_threshold=True)
CFG = dict(enable_separate_cfg=True)
FLUX_CASES = {  # (config, whether the loop runs CFG pairs)
    "thr0.3_W2": (dict(B, residual_diff_threshold=0.3, max_warmup_steps=2), False),
    "thr0.2_W1": (dict(B, residual_diff_threshold=0.2, max_warmup_steps=1), False),
    "thr0.5_W2_interval2": (dict(B, residual_diff_threshold=0.5, max_warmup_steps=4, warmup_interval=2), False),
    "dynamic_thr0.06_W2": (dict(B, **DYN, residual_diff_threshold=0.06, max_warmup_steps=2), False),
    "dynamic_thr0.2_W1": (dict(B, **DYN, residual_diff_threshold=0.2, max_warmup_steps=1), False),
    "dynamic_thr0.1_max0.3_relax1.5": (dict(B, **DYN, residual_diff_threshold=0.1, max_warmup_steps=1,
                                            max_dynamic_prune_threshold=0.3, dynamic_prune_threshold_relax_ratio=1.5),
                                       False),
    "F2B1_non_prune_3_5": (dict(B, Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.5,
                                max_warmup_steps=2, non_prune_block_ids=[3, 5]), False),
    "max_cached_steps_2": (dict(B, residual_diff_threshold=0.5, max_warmup_steps=1, max_cached_steps=2), False),
    "max_continuous_1": (dict(B, residual_diff_threshold=0.5, max_warmup_steps=1, max_continuous_cached_steps=1),
                         False),
    "mask_static": (dict(B, residual_diff_threshold=0.2, max_warmup_steps=2, steps_computation_policy="static",
                         steps_computation_mask=[1, 1, 0, 0, 1, 0, 0, 0]), False),
    "cfg_separate": (dict(B, **CFG, residual_diff_threshold=0.3, max_warmup_steps=2), True),
    "cfg_dynamic": (dict(B, **CFG, **DYN, residual_diff_threshold=0.1, max_warmup_steps=1), True),
    "cfg_dynamic_cfg_first": (dict(B, **CFG, **DYN, residual_diff_threshold=0.1, max_warmup_steps=1, cfg_compute_first=True,
                                   cfg_diff_compute_separate=False), True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FLUX_CASES)
def test_flux_prune_matches_cache_dit(flux, case):
    transformer, inputs, uncond = flux
    cache, cfg = FLUX_CASES[case]

    def loop(model):
        return zoo.denoise(model, "flux", inputs, num_steps=STEPS, uncond=uncond if cfg else None)[1]

    second = dict(residual_diff_threshold=cache["residual_diff_threshold"] * 1.5)
    theirs = run_requests(reference, copy.deepcopy(transformer), loop, cache, second)
    ours = run_requests(cachedit_fx, copy.deepcopy(transformer), loop, cache, second, compile=False)
    assert_same(theirs, ours)


def _spy_inner(seen: dict):
    """An inner compiler: aot_eager, keeping the Dynamo-level graph and the aten forward, and running each
    call under ``CountHostReads`` (its reads per call in ``seen["reads"]``)."""
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    def fw(gm, example_inputs):
        seen["aten"].append(gm)
        return boxed_nop(gm, example_inputs)

    def inner(gm, example_inputs):
        seen["dynamo"].append(gm)
        compiled = aot_eager(gm, example_inputs, fw_compiler=fw)

        def run(*args):
            with CountHostReads() as mode:
                out = compiled(*args)
            seen["reads"].append(dict(mode.ops))
            return out
        return run

    return inner


@pytest.mark.slow
def test_compiled_flux_one_graph_and_a_read_per_prunable_block(flux):
    """The cache-dit script compiled (aot_eager): cache-dit's pruned steps and outputs, one Dynamo graph and
    one inner compile for both requests (refresh_context changes a number), no graph break, no recompile;
    the graphs read the host only in the conds, one per prunable block (7 of the 8 blocks at F1B0), so a
    call makes 7 host reads whatever it prunes."""
    transformer, inputs, _ = flux
    cache, _ = FLUX_CASES["thr0.3_W2"]

    def loop(model):
        return zoo.denoise(model, "flux", inputs, num_steps=STEPS)[1]

    second = dict(residual_diff_threshold=0.45)
    theirs = run_requests(reference, copy.deepcopy(transformer), loop, cache, second)
    seen: dict = {"dynamo": [], "aten": [], "reads": []}
    counters.clear()
    model = copy.deepcopy(transformer)
    ours = run_requests(cachedit_fx, model, loop, cache, second, inner=_spy_inner(seen))
    assert_same(theirs, ours)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters["stats"])
    assert len(seen["dynamo"]) == len(seen["aten"]) == 1 and len(cache_hook(model).handle.graphs) == 1
    prunable = len(cachedit_fx.DBPruneConfig(**cache).prunable(8))
    for kind in ("dynamo", "aten"):
        gm = seen[kind][0]
        assert not host_read_nodes(gm), f"the {kind} graph reads the host: {host_read_nodes(gm)}"
        conds = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
        assert len(conds) == prunable == 7, f"{kind}: {len(conds)} conds"
    assert len(seen["reads"]) == 2 * STEPS
    for ops in seen["reads"]:
        assert ops["cond_predicate"] == prunable and sum(ops.values()) - ops["cond_predicate"] == ops["dispatched"], ops


# ----------------------------------------------------------------------------- hand-written DiTs

TINY_CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2, residual_diff_threshold=0.2,
                  enable_dynamic_prune_threshold=True)


def _tiny_loop(context):
    def loop(m):
        return euler(m, latent(12, seed=7), STEPS, *context)
    return loop


@pytest.mark.parametrize("path", ["graph", "eager"])
def test_joint_dit_prune_matches_cache_dit(path):
    """A text stream beside H (pattern 1, blocks return (E, H)): both streams pruned per block."""
    model, loop = joint_dit(6), _tiny_loop((latent(5, seed=2),))
    theirs_model = copy.deepcopy(model)
    adapter = reference.BlockAdapter(transformer=theirs_model, blocks=theirs_model.transformer_blocks,
                                     forward_pattern=reference.ForwardPattern.Pattern_1)
    second = dict(residual_diff_threshold=0.3)
    theirs = run_requests(reference, theirs_model, loop, TINY_CACHE, second, target=adapter)
    ours = run_requests(cachedit_fx, copy.deepcopy(model), loop, TINY_CACHE, second, compile=False,
                        eager=path == "eager")
    assert_same(theirs, ours)
    assert any(0 < n < 4 for r in ours for n in r.pruned_blocks), "want calls that pruned some blocks, not all"


def test_single_stream_dit_prunes_where_cache_dit_fails():
    """Pattern 3 (blocks take and return H alone): cache-dit 1.5.3's DBPrune raises a TypeError at the first
    computed block (its pattern-3 ``_process_block_outputs`` gets an extra argument); ours prunes, the graph
    path and the eager cache alike."""
    model, loop = tiny(("transformer_blocks", 6)), _tiny_loop(())
    theirs_model = copy.deepcopy(model)
    adapter = reference.BlockAdapter(transformer=theirs_model, blocks=theirs_model.transformer_blocks,
                                     forward_pattern=reference.ForwardPattern.Pattern_3)
    with pytest.raises(TypeError, match="_process_block_outputs"):
        run_requests(reference, theirs_model, loop, TINY_CACHE, {}, target=adapter)
    graph = run_requests(cachedit_fx, copy.deepcopy(model), loop, TINY_CACHE, dict(residual_diff_threshold=0.3),
                         compile=False)
    eager = run_requests(cachedit_fx, copy.deepcopy(model), loop, TINY_CACHE, dict(residual_diff_threshold=0.3),
                         compile=False, eager=True)
    assert_same(graph, eager)
