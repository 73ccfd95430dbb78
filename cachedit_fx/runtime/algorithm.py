"""The algorithm of docs/algorithm.md as pure tensor functions: the relative L1 diff, the gates that
decide a step, the TaylorSeer ladder and forecast, and the counters after a step.

Everything here is tensor arithmetic: no ``.item()``, no ``bool(tensor)``, no Python branching on
tensor values, so the rewritten graph (``torch.compile(fullgraph=True)``) and the eager cache call the
same functions. Shapes: ``S`` decision slots (1, or the batch size in per-sample mode)."""
from __future__ import annotations

import math

import torch

from .layout import MAG_PARAM_NAMES, named_params

# Which gate of docs/algorithm.md settled a step (gate_log values; 0 = no call at that step).
GATE_NAMES = {
    1: "warmup", 2: "steps_mask", 3: "max_cached_steps", 4: "max_continuous_cached_steps",
    5: "max_accumulated_diff", 6: "threshold<=0", 7: "no_reference", 8: "threshold>=1", 9: "diff_test",
    10: "retention", 11: "mag_error_test", 12: "calibrate",  # MagCache's
}
TAYLOR_START = 3  # the first step at which a computed step may add a derivative to its ladder


def across_ranks(x: torch.Tensor, group: str | None, op: str = "sum") -> torch.Tensor:
    """``x`` reduced over the ranks of ``group`` (a traceable functional collective, so it stays inside
    the graph); ``x`` itself without a group."""
    if group is None:
        return x
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, op, group))


def _abs_sums(x: torch.Tensor, slots: int) -> torch.Tensor:
    """sum|x| per slot in float32, as two reductions: over the last dim, then over the rest. One reduction
    over everything would have a size that grows with the token count, and Inductor's C++ code picks its
    accumulation by that size (chunked above 4096 elements), guarding the token count to a range: a new
    resolution outside the range compiled again. The last dim (channels) has a fixed size."""
    return x.reshape(slots, -1, x.shape[-1]).abs().sum(-1, dtype=torch.float32).sum(-1)


def relative_l1(prev: torch.Tensor, cur: torch.Tensor, slots: int, group: str | None = None) -> torch.Tensor:
    """mean|prev - cur| / mean|prev|, over everything (slots=1) or per batch element, accumulated in
    float32; shape (slots,). With a ``group`` the tensors are shards of the sequence: the sums of every
    rank's shard make the ratio (the one of the whole sequence)."""
    diff, norm = _abs_sums(prev - cur, slots), _abs_sums(prev, slots)
    if group is not None:  # one collective for both sums
        diff, norm = across_ranks(torch.stack([diff, norm]), group)
    return diff / norm


def _limit_gates(step, cached_count, run, acc_diff, p, mask):
    """Gates 1-5 of docs/algorithm.md (warmup, mask, limits), every indicator's: (condition, use_cache
    when it fires, gate id), first first."""
    stepf = step.to(torch.float64)
    in_mask = step < mask.shape[0]
    # index_select, not mask[step]: indexing with a 0-dim tensor calls __index__ (a host read)
    bit = mask.index_select(0, step.clamp(0, mask.shape[0] - 1).reshape(1)).reshape(())
    mask_bit = torch.where(in_mask, bit, torch.zeros_like(bit)) == 1
    return [
        ((stepf < p["warmup"]) & (torch.remainder(stepf, p["interval"]) == 0), False, 1),
        ((p["has_mask"] > 0) & mask_bit, False, 2),
        ((p["has_mask"] > 0) & ~mask_bit & (p["static_mask"] > 0), True, 2),
        ((p["max_cached"] >= 0) & (cached_count.double() >= p["max_cached"]), False, 3),
        ((p["max_continuous"] >= 0) & (run.double() >= p["max_continuous"]), False, 4),
        ((p["max_accumulated"] > 0) & (acc_diff >= p["max_accumulated"]), False, 5),
    ]


def _settle(gates, use_cache, gate, early_below: int):
    """Apply ``gates`` (first that fires wins) over a default decision; also returns which slots a gate
    with an id below ``early_below`` settled."""
    settled_early = torch.zeros_like(use_cache)
    for cond, value, gid in reversed(gates):
        cond = cond.expand(use_cache.shape[0])
        use_cache = torch.where(cond, torch.full_like(use_cache, value), use_cache)
        gate = torch.where(cond, torch.full_like(gate, gid), gate)
        if gid < early_below:
            settled_early = settled_early | cond
    return use_cache, gate, settled_early


def decide(step, diff, has_ref, cached_count, run, acc_diff, params, mask, rule: str = "dbcache"):
    """docs/algorithm.md's gates 1–9, first that fires wins. Returns (use_cache, gate, recorded_diff), each (S,).

    ``step`` is a 0-dim int tensor; ``diff`` the relative L1 of the Fn residual (S,), possibly NaN.
    ``recorded_diff`` is the diff the step records (gates 8/9), NaN where an earlier gate fired.
    ``rule="first_block"`` is diffusers' FirstBlockCache: no threshold gates (6, 8), and gate 9 caches
    iff ``diff <= threshold`` (NaN caches).
    """
    p = named_params(params)
    thr = p["threshold"]
    gates = _limit_gates(step, cached_count, run, acc_diff, p, mask)
    if rule == "first_block":
        gates += [(~has_ref, False, 7)]
        use_cache = ~(diff.double() > thr)
        recorded = diff
    else:
        gates += [(thr <= 0, False, 6), (~has_ref, False, 7), (thr >= 1, True, 8)]
        use_cache = torch.isfinite(diff) & (diff.double() < thr)
        recorded = torch.where(thr >= 1, torch.full_like(diff, -1.0), diff)
    gate = torch.full((diff.shape[0],), 9, dtype=torch.int8, device=diff.device)
    use_cache, gate, settled_early = _settle(gates, use_cache, gate, 8)
    recorded = torch.where(settled_early, torch.full_like(diff, math.nan), recorded)
    return use_cache, gate, recorded


def decide_magcache(step, has_ref, cached_count, run, acc_diff, params, mask, mag_params, ratios, acc_ratio, acc_err,
                    acc_steps, calibrate: bool):
    """diffusers' MagCache after gates 1-5: from the retention step on, the step's calibrated ratio
    multiplies the accumulated ratio and ``|1 - ratio|`` adds to the accumulated error (float32, as
    diffusers' tensors); skip while a residual is held, the error is within the threshold and at most
    ``max_skip`` steps ran skipped. A computed step from the retention step on resets the accumulators.

    Returns (use_cache, gate, recorded error, (acc_ratio, acc_err, acc_steps) afterwards), per slot."""
    p, m = named_params(params), dict(zip(MAG_PARAM_NAMES, mag_params.unbind(0)))
    at = step.clamp(0, ratios.shape[0] - 1).reshape(1)
    scale = torch.where(step < m["n_ratios"], ratios.index_select(0, at).reshape(()), torch.ones_like(ratios[0]))
    active = step >= m["retention"]
    ratio, n = acc_ratio * scale, acc_steps + 1
    err = acc_err + (1.0 - ratio).abs()
    skip = has_ref & (err <= p["threshold"].float()) & (n <= m["max_skip"])
    gates = [(torch.full_like(active, calibrate), False, 12), *_limit_gates(step, cached_count, run, acc_diff, p, mask),
             (~active, False, 10), (~has_ref, False, 7)]
    gate = torch.full_like(acc_steps, 11, dtype=torch.int8)
    use_cache, gate, _ = _settle(gates, skip, gate, 0)
    grown, reset = active & use_cache, active & ~use_cache
    after = (torch.where(reset, torch.ones_like(ratio), torch.where(grown, ratio, acc_ratio)),
             torch.where(reset, torch.zeros_like(err), torch.where(grown, err, acc_err)),
             torch.where(reset, torch.zeros_like(n), torch.where(grown, n, acc_steps)))
    recorded = torch.where(active & ((gate == 11) | (gate == 7)), err, torch.full_like(err, math.nan))
    return use_cache, gate, recorded, after


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


def commit(use_cache, finite, step, recorded_diff, cached_count, run, last_computed, has_ref, acc_diff):
    """Counter updates after a step (S,) each: cached steps count and extend the run, computed steps
    reset it and become the new reference point; positive recorded diffs (+inf too, NaN not)
    accumulate. A computed step whose residuals are not ``finite`` leaves no reference: the next step
    computes afresh (its calibrator history empties: calibrators.commit_history)."""
    computed = ~use_cache
    return dict(
        cached_count=cached_count + use_cache.long(),
        run=torch.where(use_cache, run + 1, torch.zeros_like(run)),
        last_computed=torch.where(computed, step.expand_as(last_computed), last_computed),
        has_ref=torch.where(computed, finite, has_ref),
        acc_diff=acc_diff + torch.where(recorded_diff > 0, recorded_diff.double(), torch.zeros_like(acc_diff)),
    )


def slot_view(per_slot, like):
    """(S,) -> (S, 1, 1, ...) so it broadcasts over a batch-first tensor (S == 1 or S == batch)."""
    return per_slot.reshape(per_slot.shape[0], *([1] * (like.dim() - 1)))
