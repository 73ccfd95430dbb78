"""Cache state of one block chain as device tensors, and the pure functions that update it.

Everything here is tensor arithmetic: no ``.item()``, no ``bool(tensor)``, no Python branching on
tensor values, so the rewritten graph (and ``torch.compile(fullgraph=True)``) can call it. The writes
into the caller-owned state tensors happen in :mod:`cachedit_fx.step`, outside the ``torch.cond``.
The semantics are those of ``docs/algorithm.md``.

Shapes: ``nb`` CFG branches (1, or 2 with separate CFG), ``S`` decision slots (1, or the batch size
in per-sample mode), ``CAP`` logged steps.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import DBCacheConfig

LOG_CAPACITY = 1024

# Which gate of docs/algorithm.md settled a step (gate_log values; 0 = no call at that step).
GATE_NAMES = {
    1: "warmup", 2: "steps_mask", 3: "max_cached_steps", 4: "max_continuous_cached_steps",
    5: "max_accumulated_diff", 6: "threshold<=0", 7: "no_reference", 8: "threshold>=1", 9: "diff_test",
}
PARAM_NAMES = ("threshold", "warmup", "interval", "max_cached", "max_continuous", "max_accumulated",
               "has_mask", "static_mask")


class BranchBy(str, enum.Enum):
    """With two CFG branches and no caller hint, which branch a call belongs to."""

    PARITY = "parity"  # calls alternate
    TIMESTEP = "timestep"  # a call whose timestep equals the previous call's is a CFG pair's second call


@dataclass(frozen=True)
class StreamSpec:
    """One value the middle segment produces (a carry into Bn): its shape, dtype and ladder length."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    ladder: int  # TaylorSeer order + 1; 1 = plain DBCache (reuse the last residual)


@dataclass(frozen=True)
class StateField:
    """One state tensor: its shape and dtype, the value :meth:`ChainState.reset` gives it (None: loaded
    by :meth:`ChainState.configure`), and whether a new request found on device clears it as well."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    initial: float | None
    per_request: bool


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
    branch_by: BranchBy = BranchBy.PARITY
    capacity: int = LOG_CAPACITY

    def fields(self) -> list[StateField]:
        """The state table, in the order the graph takes the tensors. Reference and ladders keep their
        values on a new request found on device: ``has_ref`` / ``n_computed`` say they are stale."""
        nb, s, cap, f64, i64 = self.n_branches, self.slots, self.capacity, torch.float64, torch.int64
        table = [
            # name           shape                 dtype         reset()   new request
            ("params",       (len(PARAM_NAMES),),  f64,          None,     False),
            ("mask",         (cap,),               torch.int8,   None,     False),
            ("last_t",       (1,),                 f64,          -math.inf, False),
            ("t_dir",        (1,),                 f64,          0.0,      False),
            ("branch_hint",  (1,),                 i64,          -1,       False),
            ("calls_total",  (1,),                 i64,          0,        True),
            ("calls",        (nb,),                i64,          0,        True),
            ("cached_count", (nb, s),              i64,          0,        True),
            ("run",          (nb, s),              i64,          0,        True),
            ("n_computed",   (nb, s),              i64,          0,        True),
            ("last_computed", (nb, s),             i64,          0,        True),
            ("has_ref",      (nb, s),              torch.bool,   False,    True),
            ("acc_diff",     (nb, s),              torch.float32, 0.0,     True),
            ("shared_diff",  (s,),                 torch.float32, math.nan, True),
            ("diff_log",     (nb, cap, s),         torch.float32, math.nan, True),
            ("gate_log",     (nb, cap, s),         torch.int8,   0,        True),
            ("cached_log",   (nb, cap, s),         torch.bool,   False,    True),
            ("ref",          (nb, *self.fn_shape), self.fn_dtype, 0.0,     False),
        ]
        table += [(f"ladder_{k}", (nb, st.ladder, *st.shape), st.dtype, 0.0, False)
                  for k, st in enumerate(self.streams)]
        return [StateField(*row) for row in table]

    def names(self) -> list[str]:
        return [f.name for f in self.fields()]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {f.name: (f.shape, f.dtype) for f in self.fields()}

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, JSON-able (export metadata)."""
        out = dataclasses.asdict(self)
        out["fn_shape"], out["fn_dtype"] = list(self.fn_shape), _dtype_name(self.fn_dtype)
        out["streams"] = [{"shape": list(s.shape), "dtype": _dtype_name(s.dtype), "ladder": s.ladder}
                          for s in self.streams]
        out["branch_by"] = self.branch_by.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChainLayout":
        streams = tuple(StreamSpec(tuple(s["shape"]), _dtype(s["dtype"]), s["ladder"]) for s in d["streams"])
        return cls(**{**d, "fn_shape": tuple(d["fn_shape"]), "fn_dtype": _dtype(d["fn_dtype"]), "streams": streams,
                      "branch_by": BranchBy(d["branch_by"])})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


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
        self.tensors = {f.name: torch.empty(f.shape, dtype=f.dtype, device=device) for f in layout.fields()}
        self.configure(cache_config)
        self.reset()

    def configure(self, cache_config: DBCacheConfig) -> None:
        """Load the request-level numbers (threshold, warmup, mask ...) without touching the graph."""
        params, mask = params_from_config(cache_config)
        self.tensors["params"].copy_(torch.tensor(params, dtype=torch.float64))
        self.tensors["mask"].copy_(torch.tensor(mask, dtype=torch.int8))

    def reset(self) -> None:
        for f in self.layout.fields():
            if f.initial is not None:
                self.tensors[f.name].fill_(f.initial)

    def ordered(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self.layout.names()]


# ----------------------------------------------------------------------------- pure functions


def relative_l1(prev: torch.Tensor, cur: torch.Tensor, slots: int) -> torch.Tensor:
    """mean|prev - cur| / mean|prev|, over everything (slots=1) or per batch element. Shape (slots,)."""
    p, c = prev.float().reshape(slots, -1), cur.float().reshape(slots, -1)
    return (p - c).abs().mean(dim=1) / p.abs().mean(dim=1)


def decide(step, diff, has_ref, cached_count, run, acc_diff, params, mask):
    """docs/algorithm.md's gates 1–9, first that fires wins. Returns (use_cache, gate, recorded_diff), each (S,).

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
