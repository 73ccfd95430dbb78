"""The algorithm of docs/algorithm.md as pure tensor functions: the relative L1 diff, the gates that
decide a step, the TaylorSeer ladder and forecast, and the counters after a step.

Everything here is tensor arithmetic: no ``.item()``, no ``bool(tensor)``, no Python branching on
tensor values, so the rewritten graph (``torch.compile(fullgraph=True)``) and the eager cache call the
same functions. Shapes: ``S`` decision slots (1, or the batch size in per-sample mode)."""
from __future__ import annotations

import math

import torch

from .layout import named_params

# Which gate of docs/algorithm.md settled a step (gate_log values; 0 = no call at that step).
GATE_NAMES = {
    1: "warmup", 2: "steps_mask", 3: "max_cached_steps", 4: "max_continuous_cached_steps",
    5: "max_accumulated_diff", 6: "threshold<=0", 7: "no_reference", 8: "threshold>=1", 9: "diff_test",
}
TAYLOR_START = 3  # the first step at which a computed step may add a derivative to its ladder


def across_ranks(x: torch.Tensor, group: str | None, op: str = "sum") -> torch.Tensor:
    """``x`` reduced over the ranks of ``group`` (a traceable functional collective, so it stays inside
    the graph); ``x`` itself without a group."""
    if group is None:
        return x
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, op, group))


def relative_l1(prev: torch.Tensor, cur: torch.Tensor, slots: int, group: str | None = None) -> torch.Tensor:
    """mean|prev - cur| / mean|prev| in the residuals' own dtype, over everything (slots=1) or per batch
    element; returned as float32, shape (slots,). With a ``group`` the tensors are shards of the
    sequence: the sums of every rank's shard make the ratio (the one of the whole sequence)."""
    p, c = prev.reshape(slots, -1), cur.reshape(slots, -1)
    if group is None:
        return ((p - c).abs().mean(dim=1) / p.abs().mean(dim=1)).float()
    sums = across_ranks(torch.stack([(p - c).abs().float().sum(dim=1), p.abs().float().sum(dim=1)]), group)
    return sums[0] / sums[1]


def decide(step, diff, has_ref, cached_count, run, acc_diff, params, mask):
    """docs/algorithm.md's gates 1–9, first that fires wins. Returns (use_cache, gate, recorded_diff), each (S,).

    ``step`` is a 0-dim int tensor; ``diff`` the relative L1 of the Fn residual (S,), possibly NaN.
    ``recorded_diff`` is the diff the step records (gates 8/9), NaN where an earlier gate fired.
    """
    p = named_params(params)
    thr, warmup, interval, max_cached = p["threshold"], p["warmup"], p["interval"], p["max_cached"]
    max_cont, max_acc, has_mask, static = p["max_continuous"], p["max_accumulated"], p["has_mask"], p["static_mask"]
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
        ((max_acc > 0) & (acc_diff >= max_acc), False),
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


def taylor_update(ladder, ladder_len, value, window, step):
    """New derivative ladder after a computed step: d0 = value, d[i+1] = (d[i] - d_prev[i]) / window.

    ``ladder`` (K, *shape); ``ladder_len`` (S,) valid entries before this step; ``window`` (S,) steps
    since the previous computed step. A derivative exists only where its previous entry did and from
    step ``TAYLOR_START`` on (cache-dit's rule); the others become 0 (``next_ladder_len`` says so).
    """
    new = [value]
    w = slot_view(window.to(value.dtype), value)
    late = step >= TAYLOR_START
    for i in range(ladder.shape[0] - 1):
        d = (new[i] - ladder[i]) / w
        new.append(torch.where(slot_view((ladder_len > i) & late, value), d, torch.zeros_like(d)))
    return torch.stack(new)


def next_ladder_len(ladder_len, step, longest: int):
    """Valid ladder entries after a computed step: one more (up to ``longest``) from ``TAYLOR_START`` on,
    else the value alone."""
    return torch.where(step >= TAYLOR_START, (ladder_len + 1).clamp(max=longest), torch.ones_like(ladder_len))


def taylor_approx(ladder, ladder_len, distance):
    """Forecast sum_i d[i] * distance^i / i! over the valid entries; plain reuse when K == 1."""
    out = ladder[0]
    dist = slot_view(distance.to(ladder.dtype), out)
    for i in range(1, ladder.shape[0]):
        term = ladder[i] * dist.pow(i) / math.factorial(i)
        out = out + torch.where(slot_view(ladder_len > i, out), term, torch.zeros_like(term))
    return out


def all_finite(xs, slots: int, group: str | None = None) -> torch.Tensor:
    """(S,) whether every value of each slot of every tensor in ``xs`` is finite (on every rank)."""
    bad = sum((~torch.isfinite(x.reshape(slots, -1))).sum(dim=1) for x in xs)
    return across_ranks(bad, group) == 0


def commit(use_cache, finite, step, recorded_diff, longest, cached_count, run, ladder_len, last_computed, has_ref,
           acc_diff):
    """Counter updates after a step (S,) each: cached steps count and extend the run, computed steps
    reset it, grow the ladder and become the new reference point; positive recorded diffs (+inf too,
    NaN not) accumulate. A computed step whose residuals are not ``finite`` leaves no reference and an
    empty ladder: the next step computes afresh."""
    computed = ~use_cache
    kept = computed & finite
    return dict(
        cached_count=cached_count + use_cache.long(),
        run=torch.where(use_cache, run + 1, torch.zeros_like(run)),
        ladder_len=torch.where(kept, next_ladder_len(ladder_len, step, longest),
                               torch.where(computed, torch.zeros_like(ladder_len), ladder_len)),
        last_computed=torch.where(computed, step.expand_as(last_computed), last_computed),
        has_ref=torch.where(computed, finite, has_ref),
        acc_diff=acc_diff + torch.where(recorded_diff > 0, recorded_diff.double(), torch.zeros_like(acc_diff)),
    )


def slot_view(per_slot, like):
    """(S,) -> (S, 1, 1, ...) so it broadcasts over a batch-first tensor (S == 1 or S == batch)."""
    return per_slot.reshape(per_slot.shape[0], *([1] * (like.dim() - 1)))
