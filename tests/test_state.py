"""The real cache state/glue (cachedit_fx.state / cachedit_fx.step) against the eager oracle.

A tiny driver loop plays the role of the rewritten graph: pre_step -> (cached_step | middle + computed_step)
-> post_step.
Synthetic Fn residuals are a fixed tensor times a per-step multiplier, so the relative L1 diff of
two steps is exactly |m_prev - m_cur| / |m_prev| and every gate can be hit on purpose.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from cachedit_fx import config
from cachedit_fx.config import DBCacheConfig, TaylorSeerCalibratorConfig
from cachedit_fx.runtime.algorithm import decide
from cachedit_fx.runtime.chain_state import ChainState
from cachedit_fx.runtime.layout import BranchBy, ChainLayout, diff_shared, params_from_config, stream_spec
from cachedit_fx.runtime.step import cached_step, computed_step, post_step, pre_step

from oracle import NO_REFERENCE, Oracle, run_chain

H_SHAPE = (4, 8)   # per-sample shape of H (and of the Fn residual)
E_SHAPE = (3, 8)   # per-sample shape of E
LATENT_SHAPE = (2, 8)  # per-sample shape of the latent input
TOL = dict(atol=1e-6, rtol=1e-6)


def cfg(**kw) -> DBCacheConfig:
    base = dict(Fn_compute_blocks=1, max_warmup_steps=0, residual_diff_threshold=0.08)
    base.update(kw)
    return DBCacheConfig(**base)


def order_of(calib) -> int:
    return calib.taylorseer_order if calib is not None and calib.enable_calibrator else 0


class Glue:
    """Drives the real pre_step / cached_step | computed_step / post_step the way the rewritten graph does."""

    def __init__(self, cache_config, calib=None, n_branches=1, batch=1, branch_by=BranchBy.PARITY):
        slots = batch if cache_config.per_sample else 1
        self.layout = ChainLayout(
            n_branches, slots, (batch, *H_SHAPE), torch.float32,
            (stream_spec((batch, *H_SHAPE), torch.float32, calib, "H"),
             stream_spec((batch, *E_SHAPE), torch.float32, calib, "E")),
            diff_shared=diff_shared(cache_config, n_branches), branch_by=branch_by,
            latent_shape=(batch, *LATENT_SHAPE))
        self.state = ChainState(self.layout, cache_config)

    def call(self, fn_res, middle_outputs_fn, passthrough, timestep=None, latent=None, hint=None):
        st = self.state.ordered()
        self.state.tensors["branch_hint"].fill_(-1 if hint is None else hint)
        pre = pre_step(self.layout, fn_res, timestep, latent, *st)
        ref, *ladders = (self.state.tensors[n] for n in self.layout.stored_names())
        if bool(pre.pred):
            out = cached_step(self.layout, list(passthrough), pre.branch, pre.ladder_len, pre.distance, ref, ladders)
        else:
            out = computed_step(self.layout, pre.use_cache, pre.step, pre.branch, pre.ladder_len, pre.distance,
                                fn_res, list(middle_outputs_fn()), list(passthrough), ref, ladders)
        post_step(self.layout, pre, out.finite, out.rows, *st)
        outs = out.outs
        return pre.use_cache.tolist(), outs, pre.gate.tolist(), pre.recorded.tolist(), int(pre.step), int(pre.branch)


# ----------------------------------------------------------------------------- synthetic calls


class Calls:
    """Synthetic inputs for one request: per (step, branch) an Fn residual, middle inputs and outputs.

    ``mults[b][t]`` is a number (all samples) or a list (one per sample) scaling a fixed Fn residual.
    The middle residual of each stream is a cubic in the step index, so TaylorSeer has something to fit.
    """

    def __init__(self, mults, batch=1, seed=0, t0=1000.0, nan_at=(), inf_at=(), timesteps=None):
        g = torch.Generator().manual_seed(seed)
        self.n_branches, self.n_steps, self.batch = len(mults), len(mults[0]), batch
        self.mults, self.t0, self.nan_at, self.inf_at = mults, t0, set(nan_at), set(inf_at)
        self.base = [torch.rand(batch, *H_SHAPE, generator=g) + 0.5 for _ in mults]
        self.poly = [[torch.randn(4, batch, *shape, generator=g) for shape in (H_SHAPE, E_SHAPE)] for _ in mults]
        self.inputs = [[[torch.randn(batch, *shape, generator=g) for shape in (H_SHAPE, E_SHAPE)]
                        for _ in range(self.n_steps)] for _ in mults]
        noise = torch.randn(batch, *LATENT_SHAPE, generator=g)
        self.latents = [noise * (1 - 0.02 * t) for t in range(self.n_steps)]  # shared by a step's branches
        self.timesteps = timesteps or [t0 - t for t in range(self.n_steps)]
        self.middle_calls = 0

    def fn_res(self, t, b):
        m = torch.tensor(self.mults[b][t], dtype=torch.float32).reshape(-1, *([1] * len(H_SHAPE)))
        r = self.base[b] * m
        if (t, b) in self.nan_at or t in self.nan_at:
            r = r.clone(); r[0, 0, 0] = math.nan
        if (t, b) in self.inf_at or t in self.inf_at:
            r = r.clone(); r[0, 1, 1] = math.inf
        return r

    def middle(self, t, b):
        def run():
            self.middle_calls += 1
            x = t / 10.0
            return [inp + c[0] + c[1] * x + c[2] * x ** 2 + c[3] * x ** 3
                    for inp, c in zip(self.inputs[b][t], self.poly[b])]
        return run

    def __iter__(self):
        """(fn_res, middle_fn, passthrough, timestep, latent) per call, branches alternating within a step."""
        for t in range(self.n_steps):
            for b in range(self.n_branches):
                yield (self.fn_res(t, b), self.middle(t, b), self.inputs[b][t], torch.tensor([self.timesteps[t]]),
                       self.latents[t])


def walk(n, sizes, seed, start=1.0):
    """A random multiplier walk whose per-step relative moves are drawn from ``sizes``."""
    rnd, m, out = random.Random(seed), start, []
    for _ in range(n):
        out.append(m)
        m *= 1 + rnd.choice(sizes) * rnd.choice((-1, 1))
    return out


def as_str(use_cache_per_step, slot=0):
    """'C' computed, 'r' reused (cached)."""
    return "".join("r" if u[slot] else "C" for u in use_cache_per_step)


def same_diff(a, b):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def run_both(cache_config, calls, calib=None, glue=None, oracle=None, timesteps=True, by_timestep=False,
             hints=None):
    """Feed the same calls to the real glue and the oracle; assert they agree call by call. Two
    branches are told apart by alternation, by a repeated timestep (``by_timestep``) or by the caller's
    ``hints`` (one branch per call). Returns (glue, oracle)."""
    branch_by = BranchBy.TIMESTEP if by_timestep else BranchBy.PARITY
    glue = glue or Glue(cache_config, calib, calls.n_branches, calls.batch, branch_by)
    oracle = oracle or Oracle(cache_config, calib, n_branches=calls.n_branches, n_streams=2, by_timestep=by_timestep)
    for i, (fn_res, middle, passthrough, t, x) in enumerate(calls):
        t, x = (t, x) if timesteps else (None, None)
        hint = None if hints is None else hints[i]
        g_use, g_outs, g_gate, g_diff, g_step, g_branch = glue.call(fn_res, middle, passthrough, t, x, hint)
        o_use, o_outs = oracle.call(fn_res, middle, passthrough, t, x, hint)
        o = oracle.log[-1]
        where = f"call {i} (step {o['step']}, branch {o['branch']})"
        assert (g_step, g_branch) == (o["step"], o["branch"]), where
        assert g_use == o_use, f"{where}: use_cache glue {g_use} oracle {o_use}"
        assert g_gate == o["gate"], f"{where}: gate glue {g_gate} oracle {o['gate']}"
        assert all(map(same_diff, g_diff, o["diff"])), f"{where}: diff glue {g_diff} oracle {o['diff']}"
        for g_out, o_out in zip(g_outs, o_outs):
            torch.testing.assert_close(g_out, o_out, **TOL, msg=lambda m: f"{where}: {m}")
    check_logs(glue, oracle)
    return glue, oracle


def check_logs(glue, oracle):
    """The on-device logs (gate/cached/diff per branch and step) match the oracle's."""
    tensors = glue.state.tensors
    for b in range(glue.layout.n_branches):
        n = len(oracle.branch_log(b, "gate"))
        assert tensors["gate_log"][b, :n].tolist() == oracle.branch_log(b, "gate")
        assert tensors["cached_log"][b, :n].tolist() == oracle.branch_log(b, "use_cache")
        for g_row, o_row in zip(tensors["diff_log"][b, :n].tolist(), oracle.branch_log(b, "diff")):
            assert all(map(same_diff, g_row, o_row)), (g_row, o_row)
        assert (tensors["gate_log"][b, n:] == 0).all()


def decisions(oracle, branch=0, slot=0):
    return as_str(oracle.branch_log(branch, "use_cache"), slot)


def gates(oracle, branch=0, slot=0):
    return [g[slot] for g in oracle.branch_log(branch, "gate")]


# ----------------------------------------------------------------------------- gates


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


# ----------------------------------------------------------------------------- TaylorSeer


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


def test_an_infinite_diff_accumulates_and_stops_caching():
    c = cfg(residual_diff_threshold=0.5, max_accumulated_residual_diff_threshold=10.0)
    _, o = run_both(c, Calls([[1.0, 1.01, 1.02, 1.03, 1.04, 1.05]], inf_at=[2]))
    assert decisions(o) == "CrCCCC" and gates(o)[3:] == [5, 5, 5]


def test_a_mask_bounds_the_warmup_by_its_leading_computed_steps():
    mask = [1, 1, 0, 0, 1, 0]
    _, o = run_both(cfg(max_warmup_steps=4, steps_computation_mask=mask, residual_diff_threshold=0.5),
                    Calls([[1.0 + 0.01 * t for t in range(6)]]))
    assert decisions(o) == "CCrrCr" and gates(o)[:4] == [1, 1, 9, 9]


def test_num_inference_steps_ends_a_request_without_a_timestep():
    c = cfg(num_inference_steps=3, residual_diff_threshold=0.5)
    _, o = run_both(c, Calls([[1.0, 1.01, 1.02] * 2]), timesteps=False)
    assert [e["request"] for e in o.log] == [0, 0, 0, 1, 1, 1] and [e["step"] for e in o.log] == [0, 1, 2] * 2


@pytest.mark.parametrize("policy, steps", [("once", [0, 1, 0, 1, 2, 3, 4]), ("repeat", [0, 1, 0, 1, 0, 1, 0])])
def test_force_refresh_starts_the_rest_of_the_request_afresh(policy, steps):
    c = cfg(force_refresh_step_hint=2, force_refresh_step_policy=policy, residual_diff_threshold=0.5)
    glue, o = run_both(c, Calls([[1.0 + 0.01 * t for t in range(7)]]))
    assert [e["step"] for e in o.log] == steps
    assert decisions(o)[:1] == "C"  # the refreshed context has no reference


def test_cfg_compute_first_never_shares_the_diff():
    mults = [[1.0 + 0.01 * t for t in range(4)], [2.0 ** t for t in range(4)]]
    c = cfg(enable_separate_cfg=True, cfg_diff_compute_separate=False, cfg_compute_first=True)
    glue, o = run_both(c, Calls(mults))
    assert not glue.layout.diff_shared
    assert decisions(o, 1) == "CCCC"  # its own (large) diffs, not branch 0's


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


# ----------------------------------------------------------------------------- requests


def test_timestep_going_up_starts_a_new_request():
    mults = [walk(12, (0.01, 0.05, 0.12), seed=7), walk(12, (0.02, 0.06), seed=8)]
    c = cfg(enable_separate_cfg=True, max_cached_steps=4, max_accumulated_residual_diff_threshold=0.3)
    calib = TaylorSeerCalibratorConfig(taylorseer_order=2)
    glue, o = run_both(c, Calls(mults), calib)
    first = [(e["branch"], e["step"], e["use_cache"], e["gate"]) for e in o.log]
    assert "r" in decisions(o, 0)
    run_both(c, Calls(mults), calib, glue=glue, oracle=o)
    second = [(e["branch"], e["step"], e["use_cache"], e["gate"]) for e in o.log[len(first):]]
    assert second == first
    assert len({e["request"] for e in o.log}) == 2


def test_chainstate_reset_without_timesteps():
    mults = [walk(10, (0.01, 0.05, 0.12), seed=3)]
    c = cfg(max_cached_steps=3)
    glue, o = run_both(c, Calls(mults), timesteps=False)
    first = decisions(o)
    # without a reset the second run continues the request (steps 10.., max_cached already hit)
    glue.state.reset()
    o.reset()
    run_both(c, Calls(mults), glue=glue, oracle=o, timesteps=False)
    assert decisions(o) == first
    assert int(glue.state.tensors["calls"][0]) == 10


def test_no_reset_without_timesteps_continues_the_request():
    mults = [[1.0 + 0.001 * t for t in range(4)]]
    c = cfg(max_cached_steps=3)
    glue, o = run_both(c, Calls(mults), timesteps=False)
    run_both(c, Calls(mults), glue=glue, oracle=o, timesteps=False)
    assert decisions(o) == "CrrrCCCC"


def test_configure_changes_threshold_between_requests():
    mults = [[1.0, 1.05, 1.15, 1.2, 1.24, 1.5]]
    c1, c2 = cfg(residual_diff_threshold=0.08), cfg(residual_diff_threshold=0.2, max_warmup_steps=2)
    glue, o = run_both(c1, Calls(mults))
    assert decisions(o) == "CrCrrC"
    glue.state.configure(c2)
    o.configure(c2)
    run_both(c2, Calls(mults), glue=glue, oracle=o)  # timestep goes back up: new request
    assert decisions(o) == "CCrrrC"


def requests_of(oracle):
    return [e["request"] for e in oracle.log]


def steps_of(oracle):
    return [(e["request"], e["branch"], e["step"]) for e in oracle.log]


@pytest.mark.parametrize("n_branches, by_timestep", [(1, False), (2, True), (2, False)])
def test_a_warm_up_call_at_the_first_timestep_is_its_own_request(n_branches, by_timestep):
    """A compile warm-up call with a dummy latent at the request's first timestep, then the request:
    the request's first call is not the second half of a CFG pair and keeps no warm-up reference."""
    mults = [walk(10, (0.01, 0.05, 0.12), seed=4 + b) for b in range(n_branches)]
    c = cfg(enable_separate_cfg=n_branches == 2, max_cached_steps=4)
    warm = Calls([[5.0]] * n_branches, seed=99)
    glue, o = run_both(c, warm, by_timestep=by_timestep)
    run_both(c, Calls(mults), glue=glue, oracle=o, by_timestep=by_timestep)
    _, fresh = run_both(c, Calls(mults), by_timestep=by_timestep)
    request = o.log[n_branches:]
    assert {e["request"] for e in request} == {o.log[0]["request"] + 1}
    assert [(e["branch"], e["step"], e["use_cache"]) for e in request] == \
        [(e["branch"], e["step"], e["use_cache"]) for e in fresh.log]


def test_a_request_abandoned_after_one_call_does_not_leak_into_the_next():
    mults = [walk(8, (0.01, 0.05), seed=5)]
    c = cfg(max_cached_steps=3)
    glue, o = run_both(c, Calls([mults[0][:1]], seed=7))
    run_both(c, Calls(mults), glue=glue, oracle=o)
    assert requests_of(o) == [0] + [1] * 8
    assert decisions(o) == decisions(run_both(c, Calls(mults))[1])  # the last request's


def test_img2img_after_a_cancelled_request_starts_afresh():
    """A request cancelled at t=0.75, then an img2img request from t=0.5 on: the timestep moves on by
    more than twice its last step and the latent jumps, so the second request counts from step 0."""
    first = Calls([[1.0, 1.01, 1.02, 1.03, 1.04]], seed=1, timesteps=[1.0, 0.9375, 0.875, 0.8125, 0.75])
    second = Calls([[1.0 + 0.01 * i for i in range(8)]], seed=2, timesteps=[0.5 - 0.0625 * i for i in range(8)])
    c = cfg(residual_diff_threshold=0.05, max_warmup_steps=2)
    glue, o = run_both(c, first)
    run_both(c, second, glue=glue, oracle=o)
    assert requests_of(o) == [0] * 5 + [1] * 8
    assert decisions(o)[:2] == "CC"  # the new request's warm-up runs again


def test_a_bigger_timestep_step_with_a_smooth_latent_stays_in_the_request():
    """A schedule's last step may be several times the one before it; the latent moves little."""
    calls = Calls([[1.0 + 0.01 * i for i in range(6)]], timesteps=[1.0, 0.8, 0.6, 0.5, 0.45, 0.0])
    _, o = run_both(cfg(), calls)
    assert requests_of(o) == [0] * 6


def test_named_branches_may_carry_different_latents():
    """Under cond/uncond hints the pair's second call may have another latent: the hint decides."""
    mults = [walk(6, (0.01, 0.05), seed=8), walk(6, (0.01, 0.05), seed=9)]
    calls = Calls(mults)
    uncond = [x + 1.0 for x in calls.latents]
    calls.latents = [x for pair in zip(calls.latents, uncond) for x in pair]  # one latent per call below
    calls.n_steps_latents = len(calls.latents)
    c = cfg(enable_separate_cfg=True, max_cached_steps=3)
    hints = [0, 1] * 6
    glue = Glue(c, None, 2, 1)
    o = Oracle(c, None, n_branches=2, n_streams=2)
    for i, (f, m, p, t, _) in enumerate(calls):
        x = calls.latents[i]
        g = glue.call(f, m, p, t, x, hints[i])
        assert g[0] == o.call(f, m, p, t, x, hints[i])[0]
    assert requests_of(o) == [0] * 12
    assert [e["branch"] for e in o.log] == hints


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


# ----------------------------------------------------------------------------- no host sync


def test_decide_compiles_without_graph_breaks():
    import torch._dynamo

    c = cfg(max_warmup_steps=2, max_cached_steps=5, steps_computation_mask=[1, 0, 1])
    params, mask = params_from_config(c)
    params, mask = torch.tensor(params, dtype=torch.float64), torch.tensor(mask, dtype=torch.int8)

    def f(step, diff, has_ref, cached, run, acc, params, mask):
        return decide(step, diff, has_ref, cached, run, acc, params, mask)

    args = lambda s, d: (torch.tensor(s), torch.tensor([d], dtype=torch.float32), torch.tensor([True]),
                         torch.tensor([1]), torch.tensor([0]), torch.tensor([0.0]), params, mask)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(*args(3, 0.01))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for s, d in ((0, 0.01), (1, 0.01), (3, 0.01), (3, 0.5), (4, math.nan)):
        got, want = compiled(*args(s, d)), f(*args(s, d))
        for g, w_ in zip(got, want):
            torch.testing.assert_close(g, w_, equal_nan=True)
    torch._dynamo.reset()


def test_glue_compiles_without_graph_breaks():
    """pre_step, both branches' steps and post_step (two branches, shared diff, per-sample slots) trace as one
    graph."""
    import torch._dynamo

    c = cfg(per_sample=True, enable_separate_cfg=True, cfg_diff_compute_separate=False, max_cached_steps=3)
    glue = Glue(c, TaylorSeerCalibratorConfig(taylorseer_order=2), n_branches=2, batch=2)
    layout = glue.layout

    def f(fn_res, t, x, out_h, out_e, base_h, base_e, *state):
        pre = pre_step(layout, fn_res, t, x, *state)
        st = dict(zip(layout.names(), state))
        ladders = [st["ladder_0"], st["ladder_1"]]
        cached = cached_step(layout, [base_h, base_e], pre.branch, pre.ladder_len, pre.distance, st["ref"], ladders)
        out = computed_step(layout, pre.use_cache, pre.step, pre.branch, pre.ladder_len, pre.distance, fn_res,
                            [out_h, out_e], [base_h, base_e], st["ref"], ladders)
        post_step(layout, pre, out.finite, out.rows, *state)
        return pre.pred, out.outs, cached.outs

    args = [torch.randn(2, *H_SHAPE), torch.tensor([5.0]), torch.randn(2, *LATENT_SHAPE), torch.randn(2, *H_SHAPE),
            torch.randn(2, *E_SHAPE),
            torch.randn(2, *H_SHAPE), torch.randn(2, *E_SHAPE)]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(*args, *glue.state.ordered())
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    (dict(Fn_compute_blocks=0), "Fn_compute_blocks"),
    (dict(residual_diff_threshold=math.nan), "residual_diff_threshold"),
    (dict(steps_computation_policy="sometimes"), "steps_computation_policy"),
    (dict(steps_computation_mask=[1, 2, 0]), "steps_computation_mask"),
    (dict(steps_computation_mask=[]), "steps_computation_mask"),
    (dict(steps_computation_mask=[0, 1], steps_computation_policy="static", max_warmup_steps=0),
     "steps_computation_mask"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DBCacheConfig(**kwargs)


def test_calibrator_config_validation():
    with pytest.raises(ValueError, match="taylorseer_order"):
        TaylorSeerCalibratorConfig(taylorseer_order=0)


def test_strify():
    assert DBCacheConfig().strify() == "DBCache_F8B0_W8I1M0MC0_R0.08"
    assert config.strify(DBCacheConfig()) == "DBCache_F8B0_W8I1M0MC0_R0.08_T0O0"  # cache-dit: no calibrator
    assert config.strify(DBCacheConfig(), TaylorSeerCalibratorConfig()).endswith("_T1O1")
