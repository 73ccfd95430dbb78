"""Decision slots: separate CFG (each branch its own state, or branch 1 reusing branch 0's diff) and
per-sample decisions, against the oracle."""
from __future__ import annotations

from cachedit_fx.config import TaylorSeerCalibratorConfig

from tests.runtime.glue import Calls, cfg, decisions, run_both, same_diff, walk


# ----------------------------------------------------------------------------- separate CFG


def test_separate_cfg_branches_have_their_own_state():
    # branch 0 barely moves (caches); branch 1 jumps every step (computes)
    mults = [[1.0 + 0.001 * t for t in range(6)], [2.0 ** t for t in range(6)]]
    c = cfg(enable_separate_cfg=True)
    glue, o = run_both(c, Calls(mults, batch=2), TaylorSeerCalibratorConfig())
    assert decisions(o, 0) == "Crrrrr"
    assert decisions(o, 1) == "CCCCCC"
    assert [e["branch"] for e in o.log] == [0, 1] * 6 and [e["step"] for e in o.log] == [t for t in range(6) for _ in (0, 1)]


def test_separate_cfg_shared_diff():
    # cfg_diff_compute_separate=False: branch 1 uses branch 0's diff of the same step, own counters.
    mults = [[1.0 + 0.001 * t for t in range(7)], [2.0 ** t for t in range(7)]]
    c = cfg(enable_separate_cfg=True, cfg_diff_compute_separate=False)
    _, o = run_both(c, Calls(mults))
    assert decisions(o, 0) == decisions(o, 1) == "Crrrrrr"
    assert all(same_diff(a[0], b[0]) for a, b in zip(o.branch_log(0, "diff"), o.branch_log(1, "diff")))
    # with the same diffs and the same config, branch 1's own counters give the same decisions
    mults = [[1.0, 1.2, 1.21, 1.22, 1.5, 1.51], [1.0] * 6]
    c = cfg(enable_separate_cfg=True, cfg_diff_compute_separate=False, max_continuous_cached_steps=1)
    _, o = run_both(c, Calls(mults, seed=3))
    assert decisions(o, 0) == "CCrCCr"
    assert decisions(o, 1) == "CCrCCr"


def test_separate_cfg_random():
    for shared in (True, False):
        for seed in range(3):
            mults = [walk(16, (0.01, 0.05, 0.15), seed=seed), walk(16, (0.02, 0.04, 0.2), seed=seed + 50)]
            c = cfg(enable_separate_cfg=True, cfg_diff_compute_separate=not shared, max_warmup_steps=2,
                    max_continuous_cached_steps=3)
            run_both(c, Calls(mults, seed=seed), TaylorSeerCalibratorConfig(taylorseer_order=2))


def test_cfg_compute_first_never_shares_the_diff():
    mults = [[1.0 + 0.01 * t for t in range(4)], [2.0 ** t for t in range(4)]]
    c = cfg(enable_separate_cfg=True, cfg_diff_compute_separate=False, cfg_compute_first=True)
    glue, o = run_both(c, Calls(mults))
    assert not glue.layout.diff_shared
    assert decisions(o, 1) == "CCCC"  # its own (large) diffs, not branch 0's


# ----------------------------------------------------------------------------- per-sample


def test_per_sample_decisions_are_independent():
    # sample 0 still, sample 1 jumps at step 2, sample 2 jumps every step
    mults = [[[1.0, 1.0, 1.0], [1.01, 1.0, 2.0], [1.02, 1.5, 4.0], [1.03, 1.51, 8.0], [1.04, 1.52, 16.0]]]
    c = cfg(per_sample=True)
    calls = Calls(mults, batch=3)
    _, o = run_both(c, calls, TaylorSeerCalibratorConfig())
    assert [decisions(o, 0, s) for s in range(3)] == ["Crrrr", "CrCrr", "CCCCC"]
    assert calls.middle_calls == 2 * 5  # some sample computes at every step (glue + oracle)


def test_per_sample_all_cached_uses_forecast_without_middle():
    mults = [[[1.0, 1.0], [1.01, 1.0], [1.02, 1.01]]]
    calls = Calls(mults, batch=2)
    _, o = run_both(cfg(per_sample=True), calls)
    assert [decisions(o, 0, s) for s in range(2)] == ["Crr", "Crr"]
    assert calls.middle_calls == 2


def test_per_sample_random_with_counters():
    for seed in range(3):
        mults = [list(zip(*[walk(18, (0.01, 0.04, 0.1), seed=seed * 10 + s) for s in range(3)]))]
        c = cfg(per_sample=True, max_warmup_steps=3, warmup_interval=2, max_cached_steps=8,
                max_continuous_cached_steps=2, max_accumulated_residual_diff_threshold=0.4)
        run_both(c, Calls(mults, batch=3, seed=seed, nan_at=[(9, 0)] if seed else ()),
                 TaylorSeerCalibratorConfig(taylorseer_order=2))
