"""Cache state of one block chain as device tensors, and the pure functions that update it.

Everything here is tensor arithmetic: no ``.item()``, no ``bool(tensor)``, no Python branching on
tensor values, so the rewritten graph (and ``torch.compile(fullgraph=True)``) can call it. The only
impure functions are :func:`pre_step` / :func:`post_step`, which write new values into the
caller-owned state tensors with ``copy_``/``index_copy_`` *outside* the ``torch.cond``.

Shapes: ``nb`` CFG branches (1, or 2 with separate CFG), ``S`` decision slots (1, or the batch size
in per-sample mode), ``CAP`` logged steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import DBCacheConfig, TaylorSeerCalibratorConfig

LOG_CAPACITY = 1024

# Which gate of DESIGN.md §3 settled a step (gate_log values; 0 = no call at that step).
GATE_NAMES = {
    1: "warmup", 2: "steps_mask", 3: "max_cached_steps", 4: "max_continuous_cached_steps",
    5: "max_accumulated_diff", 6: "threshold<=0", 7: "no_reference", 8: "threshold>=1", 9: "diff_test",
}
PARAM_NAMES = ("threshold", "warmup", "interval", "max_cached", "max_continuous", "max_accumulated",
               "has_mask", "static_mask")


@dataclass(frozen=True)
class StreamSpec:
    """One value the middle segment produces (a carry into Bn): its shape, dtype and ladder length."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    ladder: int  # TaylorSeer order + 1; 1 = plain DBCache (reuse the last residual)


@dataclass(frozen=True)
class ChainLayout:
    """The static (compile-time) facts of one chain's state; numbers that may change between
    requests (threshold, warmup, masks ...) live in the ``params``/``mask`` tensors instead."""

    n_branches: int
    slots: int
    fn_shape: tuple[int, ...]
    fn_dtype: torch.dtype
    streams: tuple[StreamSpec, ...]
    diff_shared: bool = False  # cfg_diff_compute_separate=False: the 2nd call of a step reuses the 1st's diff
    branch_by: str = "parity"  # with 2 branches and no caller hint: "parity" alternates calls, "timestep"
    # sends a call to branch 1 when its timestep equals the previous call's (a CFG pair's second call)
    capacity: int = LOG_CAPACITY

    def names(self) -> list[str]:
        return list(self.shapes())

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        nb, s, cap = self.n_branches, self.slots, self.capacity
        out = {
            "params": ((len(PARAM_NAMES),), torch.float64),
            "mask": ((cap,), torch.int8),
            "last_t": ((1,), torch.float64),
            "t_dir": ((1,), torch.float64),
            "branch_hint": ((1,), torch.int64),
            "calls_total": ((1,), torch.int64),
            "calls": ((nb,), torch.int64),
            "cached_count": ((nb, s), torch.int64),
            "run": ((nb, s), torch.int64),
            "n_computed": ((nb, s), torch.int64),
            "last_computed": ((nb, s), torch.int64),
            "has_ref": ((nb, s), torch.bool),
            "acc_diff": ((nb, s), torch.float32),
            "shared_diff": ((s,), torch.float32),
            "diff_log": ((nb, cap, s), torch.float32),
            "gate_log": ((nb, cap, s), torch.int8),
            "cached_log": ((nb, cap, s), torch.bool),
            "ref": ((nb, *self.fn_shape), self.fn_dtype),
        }
        for k, st in enumerate(self.streams):
            out[f"ladder_{k}"] = ((nb, st.ladder, *st.shape), st.dtype)
        return out


def params_from_config(cfg: DBCacheConfig) -> tuple[list[float], list[int]]:
    acc = cfg.max_accumulated_residual_diff_threshold
    mask = list(cfg.steps_computation_mask or [])[:LOG_CAPACITY]
    params = [cfg.residual_diff_threshold, cfg.max_warmup_steps, cfg.warmup_interval, cfg.max_cached_steps,
              cfg.max_continuous_cached_steps, 0.0 if acc is None else acc, float(bool(mask)),
              float(cfg.steps_computation_policy == "static")]
    return params, mask + [0] * (LOG_CAPACITY - len(mask))


class ChainState:
    """Caller-owned state tensors of one chain; the compiled graph mutates them in place."""

    def __init__(self, layout: ChainLayout, cache_config: DBCacheConfig, device=None):
        self.layout = layout
        self.tensors = {name: torch.empty(shape, dtype=dtype, device=device)
                        for name, (shape, dtype) in layout.shapes().items()}
        self.configure(cache_config)
        self.reset()

    def configure(self, cache_config: DBCacheConfig) -> None:
        """Load the request-level numbers (threshold, warmup, mask ...) without touching the graph."""
        params, mask = params_from_config(cache_config)
        self.tensors["params"].copy_(torch.tensor(params, dtype=torch.float64))
        self.tensors["mask"].copy_(torch.tensor(mask, dtype=torch.int8))

    def reset(self) -> None:
        for name, value in initial_values(self.layout).items():
            self.tensors[name].fill_(value)

    def ordered(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self.layout.names()]


def initial_values(layout: ChainLayout) -> dict[str, float]:
    """Values a fresh request starts from (params, mask, reference and ladders are left alone:
    their validity is carried by has_ref / n_computed)."""
    return {"last_t": -math.inf, "t_dir": 0.0, "branch_hint": -1, "calls_total": 0, "calls": 0, "cached_count": 0, "run": 0, "n_computed": 0,
            "last_computed": 0, "has_ref": False, "acc_diff": 0.0, "shared_diff": math.nan,
            "diff_log": math.nan, "gate_log": 0, "cached_log": False, "ref": 0.0,
            **{f"ladder_{k}": 0.0 for k in range(len(layout.streams))}}


# ----------------------------------------------------------------------------- pure functions


def relative_l1(prev: torch.Tensor, cur: torch.Tensor, slots: int) -> torch.Tensor:
    """mean|prev - cur| / mean|prev|, over everything (slots=1) or per batch element. Shape (slots,)."""
    p, c = prev.float().reshape(slots, -1), cur.float().reshape(slots, -1)
    return (p - c).abs().mean(dim=1) / p.abs().mean(dim=1)


def decide(step, diff, has_ref, cached_count, run, acc_diff, params, mask):
    """DESIGN.md §3 gates 1–9, first that fires wins. Returns (use_cache, gate, recorded_diff), each (S,).

    ``step`` is a 0-dim int tensor; ``diff`` the relative L1 of the Fn residual (S,), possibly NaN.
    ``recorded_diff`` is the diff the step records (gates 8/9), NaN where an earlier gate fired.
    """
    thr, warmup, interval, max_cached, max_cont, max_acc, has_mask, static = params.unbind(0)
    stepf = step.to(torch.float64)
    in_mask = step < mask.shape[0]
    # index_select, not mask[step]: indexing with a 0-dim tensor calls __index__ (a host read)
    bit = mask.index_select(0, step.clamp(0, mask.shape[0] - 1).reshape(1)).reshape(())
    mask_bit = torch.where(in_mask, bit, torch.zeros_like(bit)) == 1
    fired = [  # (condition, use_cache when it fires)
        ((stepf < warmup) & (torch.remainder(stepf, interval) == 0), False),
        ((has_mask > 0) & mask_bit, False),
        ((has_mask > 0) & ~mask_bit & (static > 0), True),
        ((max_cached >= 0) & (cached_count.double() >= max_cached), False),
        ((max_cont >= 0) & (run.double() >= max_cont), False),
        ((max_acc > 0) & (acc_diff.double() >= max_acc), False),
        (thr <= 0, False),
        (~has_ref, False),
        (thr >= 1, True),
    ]
    gate_ids = [1, 2, 2, 3, 4, 5, 6, 7, 8]
    slots = diff.shape[0]
    finite = torch.isfinite(diff)
    use_cache = finite & (diff.double() < thr)
    gate = torch.full((slots,), 9, dtype=torch.int8, device=diff.device)
    recorded = torch.where(thr >= 1, torch.full_like(diff, -1.0), diff)
    settled_early = torch.zeros(slots, dtype=torch.bool, device=diff.device)
    for (cond, value), gid in reversed(list(zip(fired, gate_ids))):
        cond = cond.expand(slots)
        use_cache = torch.where(cond, torch.full_like(use_cache, value), use_cache)
        gate = torch.where(cond, torch.full_like(gate, gid), gate)
        if gid < 8:
            settled_early = settled_early | cond
    recorded = torch.where(settled_early, torch.full_like(diff, math.nan), recorded)
    return use_cache, gate, recorded


def taylor_update(ladder, n_valid, value, window):
    """New derivative ladder after a computed step: d0 = value, d[i+1] = (d[i] - d_prev[i]) / window.

    ``ladder`` (K, *shape); ``n_valid`` (S,) entries valid before this step; ``window`` (S,) steps
    since the previous computed step. Entries whose previous derivative did not exist become 0.
    """
    new = [value]
    w = slot_view(window.to(value.dtype), value)
    for i in range(ladder.shape[0] - 1):
        d = (new[i] - ladder[i]) / w
        new.append(torch.where(slot_view(n_valid > i, value), d, torch.zeros_like(d)))
    return torch.stack(new)


def taylor_approx(ladder, n_valid, distance):
    """Forecast sum_i d[i] * distance^i / i! over the valid entries; plain reuse when K == 1."""
    out = ladder[0]
    dist = slot_view(distance.to(ladder.dtype), out)
    for i in range(1, ladder.shape[0]):
        term = ladder[i] * dist.pow(i) / math.factorial(i)
        out = out + torch.where(slot_view(n_valid > i, out), term, torch.zeros_like(term))
    return out


def commit(use_cache, step, recorded_diff, cached_count, run, n_computed, last_computed, has_ref, acc_diff):
    """Counter updates after a step (S,) each: cached steps count and extend the run, computed steps
    reset it and become the new reference point; positive finite recorded diffs accumulate."""
    computed = ~use_cache
    positive = torch.isfinite(recorded_diff) & (recorded_diff > 0)
    return dict(
        cached_count=cached_count + use_cache.long(),
        run=torch.where(use_cache, run + 1, torch.zeros_like(run)),
        n_computed=n_computed + computed.long(),
        last_computed=torch.where(computed, step.expand_as(last_computed), last_computed),
        has_ref=has_ref | computed,
        acc_diff=acc_diff + torch.where(positive, recorded_diff, torch.zeros_like(recorded_diff)),
    )


def slot_view(per_slot, like):
    """(S,) -> (S, 1, 1, ...) so it broadcasts over a batch-first tensor (S == 1 or S == batch)."""
    return per_slot.reshape(per_slot.shape[0], *([1] * (like.dim() - 1)))
