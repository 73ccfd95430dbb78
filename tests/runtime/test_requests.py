"""Request boundaries in the state: the timestep turning back up, a warm-up call, an abandoned or
cancelled request, num_inference_steps, force_refresh, reset and configure between requests."""
from __future__ import annotations

import pytest

import torch

from cachedit_fx.config import TaylorSeerCalibratorConfig
from cachedit_fx.runtime.layout import BranchBy

from tests.helpers.oracle import Oracle
from tests.runtime.glue import Calls, LATENT_SHAPE, Glue, check_logs, cfg, decisions, requests_of, run_both, walk


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


def _latents_along(timesteps, seed, scale=0.3):
    """Latents a sampler step moves in proportion to its timestep step (a fresh noise sample per seed)."""
    g = torch.Generator().manual_seed(seed)
    noise, drift = torch.randn(1, *LATENT_SHAPE, generator=g), torch.randn(1, *LATENT_SHAPE, generator=g)
    return [noise + scale * (timesteps[0] - t) * drift for t in timesteps]


def test_img2img_after_a_request_cancelled_at_twice_its_step_starts_afresh():
    """8 steps cancelled at t=0.75, then img2img from t=0.5: the timestep moves on by exactly twice its last
    step (no gap), but the latent is a fresh one, far from what the last step's change predicts."""
    first_t, second_t = [1.0, 0.875, 0.75], [0.5, 0.375, 0.25, 0.125]
    first = Calls([[1.0, 1.01, 1.02]], seed=1, timesteps=first_t)
    first.latents = _latents_along(first_t, seed=3)
    second = Calls([[1.0 + 0.01 * i for i in range(4)]], seed=2, timesteps=second_t)
    second.latents = _latents_along(second_t, seed=5)
    c = cfg(residual_diff_threshold=0.05, max_warmup_steps=2)
    glue, o = run_both(c, first)
    run_both(c, second, glue=glue, oracle=o)
    assert requests_of(o) == [0] * 3 + [1] * 4
    assert decisions(o) == decisions(run_both(c, second)[1])  # as a fresh install decides


@pytest.mark.parametrize("n_branches", [1, 2])
def test_heun_corrector_calls_stay_in_the_request(n_branches):
    """FlowMatchHeunDiscrete calls the model twice per step after the first, at the same timestep with
    two latents (the Euler guess, then the corrected one): one request, and no CFG pair's second call
    either (with two state sets told apart by a repeated timestep, every call is branch 0)."""
    steps = [1.0 - i / 6 for i in range(6)]
    timesteps = steps[:1] + [t for t in steps[1:] for _ in range(2)]
    calls = Calls([walk(len(timesteps), (0.01, 0.03), seed=6)], timesteps=timesteps)
    along = _latents_along(timesteps, seed=4)
    # the corrector's latent lies a little off the guess it corrects (Heun's averaged slope)
    calls.latents = [x + (0.02 * along[0] if i % 2 == 0 and i > 0 else 0) for i, x in enumerate(along)]
    c = cfg(enable_separate_cfg=n_branches == 2)
    glue = Glue(c, None, n_branches, 1, BranchBy.TIMESTEP)
    o = Oracle(c, None, n_branches=n_branches, n_streams=2, by_timestep=True)
    for i, (f, m, p, t, x) in enumerate(calls):
        assert glue.call(f, m, p, t, x)[0] == o.call(f, m, p, t, x)[0], i
    check_logs(glue, o)
    assert requests_of(o) == [0] * len(timesteps)
    assert [e["branch"] for e in o.log] == [0] * len(timesteps)
    assert [e["step"] for e in o.log] == list(range(len(timesteps)))
    assert "r" in decisions(o)
