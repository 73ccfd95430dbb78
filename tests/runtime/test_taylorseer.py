"""TaylorSeer: the real state's forecasts against the oracle's, the ladder's growth from step 3 on, exact
forecasts of linear residuals, plain reuse without a calibrator, and recovery after a non-finite step."""
from __future__ import annotations

import pytest
import torch

from cachedit_fx.config import TaylorSeerCalibratorConfig

from tests.helpers.oracle import NO_REFERENCE, Oracle
from tests.runtime.glue import TOL, Calls, Glue, cfg, decisions, gates, run_both, walk


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylorseer_forecast_matches_oracle(order):
    calib = TaylorSeerCalibratorConfig(taylorseer_order=order)
    # warmup fills the ladder; then computes every 2nd-4th step with varying windows
    c = cfg(max_warmup_steps=4, residual_diff_threshold=0.5, max_continuous_cached_steps=3)
    mults = [walk(20, (0.01, 0.02, 0.6), seed=order)]
    calls = Calls(mults, seed=order)
    _, o = run_both(c, calls, calib)
    used = decisions(o)
    assert "rr" in used and used.count("C") >= 7
    # with no calibrator, a cached step reuses the last computed residual (and it differs from TaylorSeer)
    run_both(c, Calls(mults, seed=order), None)


def test_taylorseer_order1_is_exact_on_linear_residuals():
    calib = TaylorSeerCalibratorConfig(taylorseer_order=1)
    # warmup computes steps 0..3 (a derivative needs a computed step >= 3, so d1 exists from step 3 on);
    # then two cached steps between computed ones: rrrr CC r CC
    c = cfg(residual_diff_threshold=1.0, max_warmup_steps=4, max_continuous_cached_steps=2)
    calls = Calls([[1.0] * 9])
    for p in calls.poly[0]:
        p[2:] = 0  # residual = a + b * t / 10
    glue = Glue(c, calib)
    for t, (fn_res, middle, passthrough, ts, x) in enumerate(calls):
        use, outs, *_ = glue.call(fn_res, middle, passthrough, ts, x)
        exact = middle()
        for got, want in zip(outs, exact):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls.middle_calls == 9 + 5  # 5 computed steps + the 9 reference evaluations above


def test_ladder_length_one_is_plain_reuse():
    c = cfg(residual_diff_threshold=1.0)
    calls = Calls([[1.0] * 4])
    glue = Glue(c, None)
    outs = [glue.call(f, m, p, t, x)[1] for f, m, p, t, x in calls]
    first_res = [o - p for o, p in zip(outs[0], calls.inputs[0][0])]
    for t in (1, 2, 3):
        for k in range(2):
            torch.testing.assert_close(outs[t][k], calls.inputs[0][t][k] + first_res[k], **TOL)


def test_taylorseer_derivatives_start_at_step_three():
    """cache-dit's ladder: a computed step adds a derivative only from step 3 on, each from an existing
    previous entry; so with warmup 3 the first cached step (3, computed at 0-2) reuses the last residual
    and with warmup 4 it forecasts with d1."""
    calib = TaylorSeerCalibratorConfig(taylorseer_order=2)
    for warmup, want in ((3, 1), (4, 2), (5, 3)):
        glue, _ = run_both(cfg(max_warmup_steps=warmup, residual_diff_threshold=1.0), Calls([[1.0] * (warmup + 1)]),
                           calib)
        assert glue.state.tensors["ladder_len"].item() == want, warmup


def test_hidden_states_calibrator_forecasts_the_value_and_e_follows_its_own_flag():
    for calib in (TaylorSeerCalibratorConfig(calibrator_cache_type="hidden_states"),
                  TaylorSeerCalibratorConfig(enable_calibrator=False, enable_encoder_calibrator=True)):
        glue, _ = run_both(cfg(max_warmup_steps=5, residual_diff_threshold=1.0), Calls([[1.0] * 9], seed=3), calib)
    assert [s.ladder for s in glue.layout.streams] == [1, 2]  # E forecast, H reused


def test_a_nan_step_with_taylorseer_recovers_at_the_next_step():
    """A non-finite residual enters neither the reference nor the ladder: the next step computes and
    every later output is finite."""
    mults = [[1.0 + 0.001 * i for i in range(12)]]
    c = cfg(residual_diff_threshold=0.1, max_warmup_steps=4)
    calib = TaylorSeerCalibratorConfig(taylorseer_order=1)
    calls = Calls(mults, nan_at=[6])
    glue = Glue(c, calib)
    o = Oracle(c, calib, n_streams=2)
    outs = []
    for f, m, p, t, x in calls:
        use, g_outs, *_ = glue.call(f, m, p, t, x)
        assert use == o.call(f, m, p, t, x)[0]
        outs.append(g_outs)
    # step 6's NaN diff computes, step 7 has no reference and computes, 8.. cache again
    assert decisions(o) == "CCCCrrCCrrrr"
    assert gates(o)[7] == NO_REFERENCE
    assert all(torch.isfinite(t).all() for step in outs[7:] for t in step)
