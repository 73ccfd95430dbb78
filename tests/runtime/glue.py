"""The driver the runtime tests run the real cache state / glue (cachedit_fx.runtime) with, against the
eager oracle (tests/helpers/oracle.py).

A tiny driver loop plays the role of the rewritten graph: pre_step -> (cached_step | middle + computed_step)
-> post_step.
Synthetic Fn residuals are a fixed tensor times a per-step multiplier, so the relative L1 diff of
two steps is exactly |m_prev - m_cur| / |m_prev| and every gate can be hit on purpose.
"""
from __future__ import annotations

import math
import random

import torch

from cachedit_fx.config import DBCacheConfig
from cachedit_fx.runtime.chain_state import ChainState
from cachedit_fx.runtime.layout import BranchBy, ChainLayout, diff_shared, stream_spec
from cachedit_fx.runtime.step import cached_step, computed_step, post_step, pre_step

from tests.helpers.oracle import Oracle

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


def requests_of(oracle):
    return [e["request"] for e in oracle.log]


def steps_of(oracle):
    return [(e["request"], e["branch"], e["step"]) for e in oracle.log]
