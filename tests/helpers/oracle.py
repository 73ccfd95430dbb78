"""A deliberately simple, eager reference implementation of docs/algorithm.md (DBCache + TaylorSeer).

Written from that text only: plain Python objects, loops and ``.item()``. It must NOT import
``cachedit_fx.runtime`` (the state and step it checks); only the config dataclasses.

Semantics pinned down there:
- step = number of calls of this branch so far - 1; branch = (calls since request start) % n_branches.
- Gates in the documented order, first that fires wins. Warmup: steps < min(max_warmup_steps, the
  mask's leading 1s) on the interval. Mask: 1 -> compute; 0 + static -> cache; 0 + dynamic -> continue;
  past the mask's end counts as 0. Gate 5 only when the threshold is not None and > 0.
- diff = mean|prev - cur| / mean|prev| in the residual's dtype, prev = Fn residual of the branch's last
  computed step (per sample in per-sample mode). Non-finite diff -> compute.
- recorded diff: -1 when gate 8 fires, the diff when gate 9 decides, NaN otherwise; the accumulated
  diff is the sum of the positive recorded diffs (+inf included) of the branch in this request.
- cached step: output = passthrough + forecast (the forecast itself for hidden-states caching);
  computed step: new reference, new TaylorSeer ladder, which gains a derivative only from step 3 on;
  a computed step with a non-finite Fn residual or middle residual leaves no reference and empty ladders.
- separate CFG with cfg_diff_compute_separate=False (and the non-CFG call first): branch 1 reuses
  branch 0's diff of the same step.
- a new request starts where the timestep turns back against its learned direction; where it moves on
  and the latent changes by over twice what the last moving call's change per unit of timestep predicts
  for the longer of this step and the last, or by over 0.5 after a step over twice the last; where it
  repeats and the latent changes by over 0.5; or where a branch has had num_inference_steps steps. A
  call named the CFG pair's second (hint 1) is not tested and not remembered. The call at step
  force_refresh_step_hint (once, or every time with "repeat") starts the rest of the request afresh.
- branch: the caller's hint, else (by_timestep) 1 for a repeated timestep with the same latent, else
  alternating calls.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from cachedit_fx.config import DBCacheConfig, TaylorSeerCalibratorConfig

# Gate numbers, as in docs/algorithm.md (0 = no call logged).
WARMUP, MASK, MAX_CACHED, MAX_CONTINUOUS, MAX_ACCUMULATED, THRESHOLD_LE0, NO_REFERENCE, THRESHOLD_GE1, \
    DIFF_TEST = range(1, 10)

NAN = float("nan")


def relative_l1(prev: torch.Tensor, cur: torch.Tensor) -> float:
    return ((prev - cur).abs().mean() / prev.abs().mean()).item()


class _Slot:
    """Everything one decision slot (the whole batch, or one sample) remembers within a request."""

    def __init__(self, n_streams: int):
        self.prev = None              # Fn residual of the last computed step
        self.last_computed = None     # step index of that step
        self.cached = 0               # cached steps so far
        self.run = 0                  # consecutive cached steps
        self.acc = 0.0                # sum of positive finite recorded diffs
        self.ladders = [[] for _ in range(n_streams)]  # per stream: [d0, d1, ...] (only valid entries)


class _Branch:
    def __init__(self, n_slots: int, n_streams: int):
        self.calls = 0
        self.slots = [_Slot(n_streams) for _ in range(n_slots)]
        self.log = []  # one dict per step of this branch


class Oracle:
    """Eager reference for one block chain.

    ``call(fn_res, middle_outputs_fn, passthrough, timestep)`` handles one transformer call:
    ``fn_res`` is the Fn residual of H (batch-first), ``passthrough`` the middle's inputs per stream
    (what a cached step adds the forecast residual to), ``middle_outputs_fn()`` computes the middle's
    outputs per stream (called only when some slot computes). Returns (use_cache per slot, outputs).
    """

    def __init__(self, cache_config: DBCacheConfig, calibrator_config: TaylorSeerCalibratorConfig | None = None,
                 n_branches: int = 1, per_sample: bool | None = None, n_streams: int = 1,
                 hidden_stream: int = 0, by_timestep: bool = False):
        self.cfg = cache_config
        self.calibrator = calibrator_config
        self.n_branches = n_branches
        self.per_sample = cache_config.per_sample if per_sample is None else per_sample
        self.n_streams = n_streams
        self.hidden_stream = hidden_stream
        self.by_timestep = by_timestep  # two branches told apart by a repeated timestep, not by alternation
        self.log = []  # one dict per call, across requests (request index included)
        self.request = -1
        self.reset()

    # --------------------------------------------------------------- request-level control
    def configure(self, cache_config: DBCacheConfig) -> None:
        self.cfg = cache_config

    def reset(self) -> None:
        self.last_t, self.direction, self.last_dt, self.rate, self.prev_latent = -math.inf, 0, 0.0, 0.0, None
        self._new_request()

    def _new_request(self) -> None:
        self.request += 1
        self.refreshed = False
        self._new_context()

    def _new_context(self) -> None:
        self.calls_total = 0
        self.branches = None  # built lazily: the number of slots is known at the first call
        self.shared_diffs = {}  # step -> branch 0's diffs (cfg_diff_compute_separate=False)

    def calibrated(self, stream: int) -> bool:
        cal = self.calibrator
        if cal is None:
            return False
        return cal.enable_calibrator if stream == self.hidden_stream else cal.enable_encoder_calibrator

    def ladder_length(self, stream: int) -> int:
        return self.calibrator.taylorseer_order + 1 if self.calibrated(stream) else 1

    def absolute(self, stream: int) -> bool:
        return self.calibrated(stream) and self.calibrator.calibrator_cache_type == "hidden_states"

    @property
    def diff_shared(self) -> bool:
        return self.n_branches == 2 and not self.cfg.cfg_diff_compute_separate and not self.cfg.cfg_compute_first

    def warmup(self) -> int:
        mask = self.cfg.steps_computation_mask
        if mask is None:
            return self.cfg.max_warmup_steps
        leading = next((i for i, bit in enumerate(mask) if bit == 0), len(mask))
        return min(self.cfg.max_warmup_steps, leading)

    # --------------------------------------------------------------- the algorithm
    def decide(self, step: int, slot: _Slot, diff: float) -> tuple[bool, int, float]:
        """(use_cache, gate, recorded diff) for one slot at one step."""
        c = self.cfg
        if step < self.warmup() and step % c.warmup_interval == 0:
            return False, WARMUP, NAN
        if c.steps_computation_mask is not None:
            mask = list(c.steps_computation_mask)
            bit = mask[step] if step < len(mask) else 0
            if bit == 1:
                return False, MASK, NAN
            if c.steps_computation_policy == "static":
                return True, MASK, NAN
        if c.max_cached_steps >= 0 and slot.cached >= c.max_cached_steps:
            return False, MAX_CACHED, NAN
        if c.max_continuous_cached_steps >= 0 and slot.run >= c.max_continuous_cached_steps:
            return False, MAX_CONTINUOUS, NAN
        acc_max = c.max_accumulated_residual_diff_threshold
        if acc_max is not None and acc_max > 0 and slot.acc >= acc_max:
            return False, MAX_ACCUMULATED, NAN
        if c.residual_diff_threshold <= 0:
            return False, THRESHOLD_LE0, NAN
        if slot.prev is None:
            return False, NO_REFERENCE, NAN
        if c.residual_diff_threshold >= 1:
            return True, THRESHOLD_GE1, -1.0
        if not math.isfinite(diff):
            return False, DIFF_TEST, diff
        return diff < c.residual_diff_threshold, DIFF_TEST, diff

    @staticmethod
    def forecast(ladder: list, distance: int) -> torch.Tensor:
        out = ladder[0]
        for i in range(1, len(ladder)):
            out = out + ladder[i] * (distance ** i / math.factorial(i))
        return out

    def _piece(self, t: torch.Tensor, s: int) -> torch.Tensor:
        return t[s:s + 1] if self.per_sample else t

    def _boundary(self, timestep, latent, hint=None) -> bool | None:
        """Start a new request where the call shows one; returns whether its timestep and latent repeat the
        last call's (the second call of a CFG pair), None without a timestep."""
        if hint == 1:  # the named second call of a pair: its latent may differ; the first call decided
            return None if timestep is None else False
        change = None
        if latent is not None:
            change = 0.0
            if self.prev_latent is not None:
                change = ((latent - self.prev_latent).abs().mean() / self.prev_latent.abs().mean()).item()
            self.prev_latent = latent.clone()
        if timestep is None:
            return None
        t = float(torch.as_tensor(timestep).reshape(-1)[0].item())
        delta = t - self.last_t
        moving = self.direction != 0 and delta * self.direction > 0
        new = self.direction != 0 and delta * self.direction < 0  # the timestep turned back
        if change is not None:
            expected = self.rate * max(abs(delta), self.last_dt)  # the change the last moving call predicts
            if moving and self.rate > 0 and change > 2 * expected and change > 0.5:
                new = True
            if moving and self.last_dt > 0 and abs(delta) > 2 * self.last_dt and change > 0.5:
                new = True  # a gap in the timestep and a jump of the latent
            if delta == 0 and change > 0.5:  # the same timestep, another latent: not a Heun corrector
                new = True
        if new:
            self._new_request()
            self.direction, self.last_dt, self.rate = 0, 0.0, 0.0
        elif math.isfinite(self.last_t) and delta != 0:
            if self.direction == 0:
                self.direction = 1 if delta > 0 else -1
            self.last_dt = abs(delta)
            if change is not None:
                self.rate = change / abs(delta)
        self.last_t = t
        return delta == 0 and not new and change in (None, 0.0)

    def _branch(self, same_t, hint) -> int:
        if hint is not None:
            return min(hint, self.n_branches - 1)
        if self.by_timestep and same_t is not None:
            return int(same_t)
        return self.calls_total % self.n_branches

    def call(self, fn_res: torch.Tensor, middle_outputs_fn: Callable[[], Sequence[torch.Tensor]],
             passthrough: Sequence[torch.Tensor], timestep=None, latent=None, hint=None):
        same_t = self._boundary(timestep, latent, hint)
        n_slots = fn_res.shape[0] if self.per_sample else 1
        if self.branches is None:
            self.branches = [_Branch(n_slots, self.n_streams) for _ in range(self.n_branches)]
        b = self._branch(same_t, hint)
        if self.cfg.num_inference_steps and self.branches[b].calls >= self.cfg.num_inference_steps:
            self._new_request()
            self.branches = [_Branch(n_slots, self.n_streams) for _ in range(self.n_branches)]
            b = self._branch(same_t, hint)
        refresh_at = self.cfg.force_refresh_step_hint
        if refresh_at and self.branches[b].calls == refresh_at and (
                not self.refreshed or self.cfg.force_refresh_step_policy == "repeat"):
            self.refreshed = True
            self._new_context()
            self.branches = [_Branch(n_slots, self.n_streams) for _ in range(self.n_branches)]
            b = self._branch(same_t, hint)
        self.calls_total += 1
        branch = self.branches[b]
        step = branch.calls
        branch.calls += 1

        # diffs, then decisions (per slot)
        if self.diff_shared and b == 1:
            diffs = self.shared_diffs[step]
        else:
            diffs = [relative_l1(slot.prev, self._piece(fn_res, s)) if slot.prev is not None else NAN
                     for s, slot in enumerate(branch.slots)]
            if self.diff_shared:
                self.shared_diffs[step] = diffs
        decisions = [self.decide(step, slot, diffs[s]) for s, slot in enumerate(branch.slots)]
        use_cache = [d[0] for d in decisions]

        computed_outs = None if all(use_cache) else list(middle_outputs_fn())
        outs = []
        for k in range(self.n_streams):
            pieces = []
            for s, slot in enumerate(branch.slots):
                base = self._piece(passthrough[k], s)
                if use_cache[s]:
                    forecast = self.forecast(slot.ladders[k], step - slot.last_computed).to(base.dtype)
                    pieces.append(forecast if self.absolute(k) else base + forecast)
                else:
                    pieces.append(self._piece(computed_outs[k], s))
            outs.append(torch.cat(pieces) if self.per_sample else pieces[0])

        # state updates
        for s, slot in enumerate(branch.slots):
            cached, _, recorded = decisions[s]
            if recorded > 0:  # +inf too; NaN is not > 0
                slot.acc += recorded
            if cached:
                slot.cached += 1
                slot.run += 1
                continue
            values = []
            for k in range(self.n_streams):
                value = self._piece(computed_outs[k], s)
                values.append(value if self.absolute(k) else value - self._piece(passthrough[k], s))
            slot.run = 0
            if not all(torch.isfinite(v).all() for v in [self._piece(fn_res, s), *values]):
                # a NaN / inf step leaves no reference and empty ladders: the next step computes afresh
                slot.prev, slot.ladders = None, [[] for _ in range(self.n_streams)]
                slot.last_computed = step
                continue
            for k, value in enumerate(values):
                old, new = slot.ladders[k], [value]
                if step >= 3:  # derivatives from step 3 on, each from an existing previous one
                    for i in range(min(len(old), self.ladder_length(k) - 1)):
                        new.append((new[i] - old[i]) / (step - slot.last_computed))
                slot.ladders[k] = new
            slot.prev = self._piece(fn_res, s).clone()
            slot.last_computed = step

        entry = dict(request=self.request, branch=b, step=step, use_cache=use_cache,
                     gate=[d[1] for d in decisions], diff=[d[2] for d in decisions])
        branch.log.append(entry)
        self.log.append(entry)
        return use_cache, outs

    # --------------------------------------------------------------- views of the log
    def branch_log(self, b: int, key: str) -> list:
        """Per step of branch ``b`` in the current request: the list (per slot) of ``key``."""
        return [e[key] for e in self.branches[b].log] if self.branches else []


# ------------------------------------------------------------------- whole chains, eagerly


def run_chain(oracle: Oracle, fn, middle, bn, h, e=None, timestep=None):
    """One transformer call of a block chain, eagerly, with the oracle deciding.

    ``fn(h, e) -> (h_F, e_F)``, ``middle(h_F, e_F) -> (h_M, e_M)``, ``bn(h_M, e_M) -> anything``
    (``e``/``e_F``/``e_M`` may be None when the chain has no E stream). The Fn residual is taken on H
    only; the streams are (H,) or (H, E). Returns (bn's result, use_cache per slot).
    """
    h_f, e_f = fn(h, e)
    has_e = e_f is not None
    passthrough = [h_f, e_f] if has_e else [h_f]

    def middle_outputs():
        h_m, e_m = middle(h_f, e_f)
        return [h_m, e_m] if has_e else [h_m]

    use_cache, outs = oracle.call(h_f - h, middle_outputs, passthrough, timestep)
    return bn(outs[0], outs[1] if has_e else None), use_cache


def chain_callables(blocks: Sequence, n_fn: int, n_bn: int, call_block):
    """Split ``blocks`` into Fn / middle / Bn callables for :func:`run_chain`.

    ``call_block(block, h, e) -> (h, e)`` adapts a block's own signature/return layout.
    """
    n = len(blocks)
    if not (1 <= n_fn and 0 <= n_bn and n_fn + n_bn <= n):
        raise ValueError(f"need 1 <= Fn ({n_fn}), 0 <= Bn ({n_bn}), Fn + Bn <= {n}")

    def segment(part):
        def run(h, e):
            for blk in part:
                h, e = call_block(blk, h, e)
            return h, e
        return run

    return segment(blocks[:n_fn]), segment(blocks[n_fn:n - n_bn]), segment(blocks[n - n_bn:])
