"""The gates of docs/algorithm.md, one by one and in random combinations: the real state / glue
(cachedit_fx.runtime) against the eager oracle, call by call (tests/runtime/glue.py drives both)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.oracle import Oracle, run_chain
from tests.runtime.glue import E_SHAPE, H_SHAPE, TOL, Calls, Glue, cfg, decisions, gates, run_both, walk


def test_first_step_has_no_reference_then_diff_test():
    # m: 1, 1.05 (diff .05 < .08 cache), 1.2 (diff .2 vs step 0: compute), 1.26 (.05 cache)
    _, o = run_both(cfg(), Calls([[1.0, 1.05, 1.2, 1.26]]))
    assert decisions(o) == "CrCr"
    assert gates(o) == [7, 9, 9, 9]
    diffs = [d[0] for d in o.branch_log(0, "diff")]
    assert math.isnan(diffs[0]) and diffs[1] == pytest.approx(0.05, rel=1e-5)


def test_diff_reference_is_last_computed_step_not_previous_step():
    # step 2 is 0.10 away from step 0 (last computed) but only 0.048 from step 1 (cached).
    _, o = run_both(cfg(), Calls([[1.0, 1.05, 1.10, 1.10 * 1.05]]))
    assert decisions(o) == "CrCr"
    assert o.branch_log(0, "diff")[2][0] == pytest.approx(0.10, rel=1e-5)


def test_warmup_with_interval():
    # warmup range(0, 6, 2) -> steps 0, 2, 4 forced; 1, 3, 5 go through the diff test (tiny diffs).
    mults = [[1.0 + 0.01 * t for t in range(8)]]
    _, o = run_both(cfg(max_warmup_steps=6, warmup_interval=2), Calls(mults))
    assert decisions(o) == "CrCrCrrr"
    assert gates(o)[:6] == [1, 9, 1, 9, 1, 9]


@pytest.mark.parametrize("policy", ["static", "dynamic"])
def test_steps_computation_mask(policy):
    mask = [1, 1, 0, 0, 1, 0, 0]
    # Big diffs at steps 3 and 6 (would compute under the diff test); steps 7+ are past the mask.
    mults = [[1.0, 1.01, 1.02, 2.0, 2.01, 2.02, 4.0, 4.01, 8.0, 8.05]]
    _, o = run_both(cfg(steps_computation_mask=mask, steps_computation_policy=policy), Calls(mults))
    if policy == "static":
        assert decisions(o) == "CCrrCrrrrr"
        assert gates(o) == [2] * 10
    else:
        assert decisions(o) == "CCrCCrCrCr"
        assert gates(o) == [2, 2, 9, 9, 2, 9, 9, 9, 9, 9]


def test_max_cached_steps():
    _, o = run_both(cfg(max_cached_steps=2), Calls([[1.0 + 0.001 * t for t in range(6)]]))
    assert decisions(o) == "CrrCCC"
    assert gates(o)[3:] == [3, 3, 3]


def test_max_continuous_cached_steps():
    _, o = run_both(cfg(max_continuous_cached_steps=2), Calls([[1.0 + 0.001 * t for t in range(8)]]))
    assert decisions(o) == "CrrCrrCr"
    assert gates(o)[3] == 4 and gates(o)[6] == 4


def test_max_accumulated_residual_diff_threshold():
    # recorded diffs .05, .04, .03 accumulate to .12 >= .1: from step 4 on every step computes (gate 5).
    mults = [[1.0, 1.05, 0.96, 1.03, 1.02, 1.021, 1.022]]
    _, o = run_both(cfg(max_accumulated_residual_diff_threshold=0.1), Calls(mults))
    assert decisions(o) == "CrrrCCC"
    assert gates(o) == [7, 9, 9, 9, 5, 5, 5]
    # computed steps record their diff too (and it counts): .2 at step 1 computes, then .04 + .04
    mults = [[1.0, 1.2, 1.248, 1.152, 1.153]]
    _, o = run_both(cfg(max_accumulated_residual_diff_threshold=0.25), Calls(mults))
    assert decisions(o) == "CCrrC"
    assert gates(o)[-1] == 5


def test_max_accumulated_none_or_zero_is_off():
    mults = [[1.0 + 0.05 * (t % 2) for t in range(6)]]
    for acc in (None, 0.0):
        _, o = run_both(cfg(max_accumulated_residual_diff_threshold=acc), Calls(mults))
        assert decisions(o) == "Crrrrr"


def test_threshold_le_zero_always_computes():
    for thr in (0.0, -1.0):
        _, o = run_both(cfg(residual_diff_threshold=thr), Calls([[1.0] * 5]))
        assert decisions(o) == "CCCCC"
        assert gates(o) == [6] * 5


def test_threshold_ge_one_always_caches_and_records_minus_one():
    _, o = run_both(cfg(residual_diff_threshold=1.0), Calls([[1.0, 5.0, 0.1, 9.0]]))
    assert decisions(o) == "Crrr"
    assert gates(o) == [7, 8, 8, 8]
    assert [d[0] for d in o.branch_log(0, "diff")][1:] == [-1.0] * 3


def test_threshold_ge_one_with_max_continuous_and_accumulated():
    # -1 is not a positive diff: it never accumulates.
    c = cfg(residual_diff_threshold=1.5, max_continuous_cached_steps=2, max_accumulated_residual_diff_threshold=0.01)
    _, o = run_both(c, Calls([[1.0 + t for t in range(7)]]))
    assert decisions(o) == "CrrCrrC"


def test_non_finite_diffs_compute():
    mults = [[1.0 + 0.001 * t for t in range(9)]]
    # NaN at step 3 (computes; it becomes the reference, so step 4 computes too), inf at step 7.
    _, o = run_both(cfg(), Calls(mults, nan_at=[3], inf_at=[7]))
    assert decisions(o) == "CrrCCrrCC"
    assert gates(o)[3] == 9 and not math.isfinite(o.branch_log(0, "diff")[3][0])


def test_an_infinite_diff_accumulates_and_stops_caching():
    c = cfg(residual_diff_threshold=0.5, max_accumulated_residual_diff_threshold=10.0)
    _, o = run_both(c, Calls([[1.0, 1.01, 1.02, 1.03, 1.04, 1.05]], inf_at=[2]))
    assert decisions(o) == "CrCCCC" and gates(o)[3:] == [5, 5, 5]


def test_a_mask_bounds_the_warmup_by_its_leading_computed_steps():
    mask = [1, 1, 0, 0, 1, 0]
    _, o = run_both(cfg(max_warmup_steps=4, steps_computation_mask=mask, residual_diff_threshold=0.5),
                    Calls([[1.0 + 0.01 * t for t in range(6)]]))
    assert decisions(o) == "CCrrCr" and gates(o)[:4] == [1, 1, 9, 9]


def test_all_gates_random_sequences():
    """Many random walks x config combinations: decisions, diffs, gates and outputs agree."""
    combos = [
        dict(),
        dict(max_warmup_steps=5, warmup_interval=2, max_cached_steps=6),
        dict(max_continuous_cached_steps=1, residual_diff_threshold=0.12),
        dict(max_accumulated_residual_diff_threshold=0.3, max_warmup_steps=2),
        dict(steps_computation_mask=[1, 0, 0, 1, 0, 1, 0, 0, 0, 1], steps_computation_policy="dynamic"),
        dict(steps_computation_mask=[1, 0, 0, 1, 0, 0], steps_computation_policy="static", max_cached_steps=3),
        dict(max_warmup_steps=3, max_continuous_cached_steps=3, max_cached_steps=9,
             max_accumulated_residual_diff_threshold=0.5, residual_diff_threshold=0.1),
    ]
    for i, kw in enumerate(combos):
        for seed in range(3):
            mults = [walk(24, (0.01, 0.03, 0.05, 0.12), seed=100 * i + seed)]
            run_both(cfg(**kw), Calls(mults, seed=seed, nan_at=[17] if seed == 2 else ()))


# ----------------------------------------------------------------------------- the chain helper


def test_run_chain_helper_matches_glue():
    torch.manual_seed(0)
    w = [torch.randn(8, 8) * 0.3 for _ in range(4)]
    fn = lambda h, e: (torch.tanh(h @ w[0]) + h, e)
    middle = lambda h, e: (torch.tanh(h @ w[1]) + h, e + h[:, :3] * 0.1)
    bn = lambda h, e: (h @ w[3], e)
    c = cfg(residual_diff_threshold=0.3, max_continuous_cached_steps=2)
    o = Oracle(c, n_streams=2)
    glue = Glue(c)
    h = torch.randn(1, *H_SHAPE)
    e = torch.randn(1, *E_SHAPE)
    for t in range(6):
        h_t, e_t = h * (1 + 0.02 * t), e
        (out_o, _), use = run_chain(o, fn, middle, bn, h_t, e_t, torch.tensor([1000.0 - t]))
        h_f, e_f = fn(h_t, e_t)
        g_use, g_outs, *_ = glue.call(h_f - h_t, lambda: list(middle(h_f, e_f)), [h_f, e_f], torch.tensor([1000.0 - t]))
        assert g_use == use
        torch.testing.assert_close(bn(*g_outs)[0], out_o, **TOL)
    assert "r" in decisions(o)
