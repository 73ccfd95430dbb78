"""The per-call glue around the ``torch.cond``: read state, decide, and write state back.

The rewritten graph calls :func:`pre_step` before the cond, :func:`cached_step` or
:func:`computed_step` inside its branches and :func:`post_step` after it. All are composed from the
pure functions in :mod:`cachedit_fx.runtime.algorithm` (when to cache: DBCache, FirstBlockCache,
MagCache) and :mod:`cachedit_fx.runtime.calibrators` (how: TaylorSeer, FoCa, DMD). The branches only
compute: what a step stores (reference, calibrator histories) leaves the cond as rows, one per store
after a computed step, and after a cached one only those of a calibrator that stores on cached steps
(FoCa), and :func:`post_step` writes them (``index_copy_`` into caller-owned tensors, outside the cond,
where AOTAutograd keeps them as input mutations and Inductor turns them into in-place kernels). A
cached call so reads and writes no activation-sized state beyond the diff's reference and the
histories it forecasts from.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import calibrators
from .algorithm import across_ranks, all_finite, commit, decide, decide_magcache, relative_l1, slot_view
from .calibrators import Counters
from .layout import BranchBy, ChainLayout, Clear, param

# Request boundaries from the latent's continuity (docs/algorithm.md, "Requests"). A denoising step changes
# the latent (relative L1) in proportion to its timestep step: ``rate`` = change / |step| of the last
# moving call predicts the next one within x1.3 on the samplers measured (Euler, Heun, renoising, 2-50
# steps); a fresh latent changes by 1.2-1.9 (a fresh noise sample ~1.4), a sampler step by 0.01-0.7.
RATE_JUMP = 2.0  # a moving call whose change exceeds this times the rate's prediction starts a request
LATENT_JUMP = 0.5  # ... as does one at the same timestep, or after a gap of over twice the last step, above this


class PreStep(NamedTuple):
    """What :func:`pre_step` decided for one call; the cond's branches and :func:`post_step` read it."""

    pred: torch.Tensor  # 0-dim bool the cond reads: every slot takes the cached branch
    use_cache: torch.Tensor  # (S,)
    gate: torch.Tensor  # (S,) int8, the gate that settled each slot
    recorded: torch.Tensor  # (S,) the diff the step logs
    step: torch.Tensor  # 0-dim, the branch's 0-based step
    branch: torch.Tensor  # (1,), the CFG branch of this call
    ladder_len: torch.Tensor  # (S,) valid TaylorSeer ladder entries
    distance: torch.Tensor  # (S,) steps since the last computed step


class BranchOut(NamedTuple):
    """What either branch of the cond returns (flattened: ``outs``, ``finite``, ``rows``)."""

    outs: tuple[torch.Tensor, ...]  # the middle's outputs: forecast, computed, or mixed per slot
    finite: torch.Tensor  # (S,) the slot's residuals are finite (True after a cached step)
    # The branch's new reference and history rows, ``(1, ...)`` each after a computed step and ``(0, ...)``
    # after a cached one (but FoCa's history, which a cached step updates): post_step writes the rows
    # there are, so a cached step writes no reference.
    rows: tuple[torch.Tensor, ...]
    logged: tuple[torch.Tensor, ...] = ()  # (S,) values post_step logs per step (MagCache calibration's ratio)

    def flat(self) -> tuple[torch.Tensor, ...]:
        """The tensors in the order a cond branch returns them."""
        return (*self.outs, self.finite, *self.rows, *self.logged)


def branch_entry(layout, tensor, branch):
    """The call's CFG branch's entry of a per-branch state tensor, for any layout with ``n_branches`` (a
    chain's or a pruned chain's): a view with one branch; with two, gathered on device (no host read)."""
    return tensor[0] if layout.n_branches == 1 else tensor.index_select(0, branch)[0]


def _write(tensor, branch, value):
    tensor.index_copy_(0, branch, value.unsqueeze(0))


def _state(layout: ChainLayout, state):
    return dict(zip(layout.names(), state))


def _branch(layout: ChainLayout, hint, calls_total, same_timestep):
    """The CFG branch of this call: the caller's hint (diffusers' cache_context), else a repeated
    timestep (BranchBy.TIMESTEP), else alternating calls."""
    if layout.branch_by is BranchBy.TIMESTEP and same_timestep is not None:
        auto = same_timestep.long()
    else:
        auto = torch.remainder(calls_total, layout.n_branches)
    return torch.where(hint >= 0, hint.clamp(max=layout.n_branches - 1), auto)


def _latent_change(layout: ChainLayout, st: dict, latent):
    """(relative L1 change of the latent input since the last call that recorded one (0 before any),
    the latent in the state's dtype)."""
    prev, seen = st["prev_latent"], st["latent_seen"]
    x = latent.to(prev.dtype)
    change = relative_l1(prev, x, 1, layout.group).double()
    return torch.where(seen, change, torch.zeros_like(change)), x


def _request_boundary(layout: ChainLayout, st: dict, timestep, latent):
    """Whether this call starts a new request by its inputs, and whether it repeats the last call's timestep
    and latent (a CFG pair's second call); updates what the next call is compared with.

    The timestep turns back against the direction it has been moving; or it moves on while the latent
    changes by over ``RATE_JUMP`` times what the last moving call's change per timestep unit predicts (for
    a step as long as this one or the last, whichever is longer) and by over ``LATENT_JUMP``, or after a gap of over twice the last
    step with a change over ``LATENT_JUMP``; or it repeats while the latent changes by over
    ``LATENT_JUMP`` (a warm-up call, a request abandoned after one call; a Heun corrector at the same
    timestep changes it less). A call the caller names the second of a CFG pair (``branch_hint == 1``)
    may carry another latent: it neither tests nor updates."""
    last, direction, last_dt, rate = st["last_t"], st["t_dir"], st["last_dt"], st["rate"]
    now = timestep.reshape(-1)[:1].to(torch.float64)
    delta = now - last
    step = delta.abs()
    counts = st["branch_hint"] != 1
    same_timestep = delta == 0
    turned = (direction != 0) & (delta * direction < 0)
    if latent is not None and layout.latent_shape:
        change, x = _latent_change(layout, st, latent)
        moving = (direction != 0) & (delta * direction > 0)
        # and a jump a step cannot make: a forecast step (TaylorSeer order 2) may change the latent more
        # than twice the last step did, but not by LATENT_JUMP
        out_of_rate = ((rate > 0) & (change > RATE_JUMP * rate * torch.maximum(step, last_dt))
                       & (change > LATENT_JUMP))
        gap = (last_dt > 0) & (step > 2 * last_dt) & (change > LATENT_JUMP)
        fresh = same_timestep & (change > LATENT_JUMP)
        request = counts & (turned | (moving & (out_of_rate | gap)) | fresh)
        same_timestep = same_timestep & (change == 0)
        st["prev_latent"].copy_(torch.where(counts.reshape((1,) * x.dim()), x, st["prev_latent"]))
        st["latent_seen"].copy_(st["latent_seen"] | counts)
    else:
        change, request = None, counts & turned
    learn = counts & ~request & torch.isfinite(last) & (delta != 0)
    zero = torch.zeros_like(direction)
    direction.copy_(torch.where(request, zero, torch.where(learn & (direction == 0), torch.sign(delta), direction)))
    last_dt.copy_(torch.where(request, zero, torch.where(learn, step, last_dt)))
    if change is not None:
        rate.copy_(torch.where(request, zero, torch.where(learn, change / step.clamp(min=1e-300), rate)))
    last.copy_(torch.where(counts, now, last))
    return request, same_timestep


def _start_of_request_or_context(layout: ChainLayout, st: dict, timestep, latent):
    """Clear the state where this call starts a new request or context; returns the call's branch.

    A request starts where the call's inputs show one (:func:`_request_boundary`) or after
    ``num_inference_steps`` steps of a branch. A context ends at step ``force_refresh_step_hint`` (once
    per request, or of every context with the "repeat" policy): the rest of the request starts afresh.
    The conditions are found on the counters as the earlier ones would leave them, so the state is
    written once."""
    zero = torch.zeros_like(st["calls_total"])
    turned = torch.zeros_like(st["calls_total"], dtype=torch.bool)
    same_timestep = None
    if timestep is not None:
        turned, same_timestep = _request_boundary(layout, st, timestep, latent)
    n_steps, hint, repeat = (param(st["params"], name) for name in ("n_steps", "refresh_hint", "refresh_repeat"))
    hint_branch, calls_total, calls = st["branch_hint"], st["calls_total"], st["calls"]

    def step_of_call(cleared):  # the step this call takes if the state were cleared where ``cleared``
        branch = _branch(layout, hint_branch, torch.where(cleared, zero, calls_total), same_timestep)
        return torch.where(cleared, zero, calls.index_select(0, branch)).double()

    request = turned | ((n_steps > 0) & (step_of_call(turned) >= n_steps))
    refreshes = torch.where(request, zero, st["refreshes"])
    refresh = (hint > 0) & (step_of_call(request) == hint) & ((repeat > 0) | (refreshes == 0))
    context = request | refresh
    for f in layout.fields():
        if f.clear is not Clear.NEVER:
            when = request if f.clear is Clear.REQUEST else context
            st[f.name].copy_(torch.where(when, torch.full_like(st[f.name], f.initial), st[f.name]))
    st["refreshes"].add_(refresh.long())
    return _branch(layout, hint_branch, st["calls_total"], same_timestep)


def begin_call(layout, st: dict, timestep, latent):
    """The start of every call, whatever the cache type: clear the state where this call starts a new
    request or context, then count the call in its CFG branch. ``st``: the state tensors by name (any
    layout whose table starts with :func:`~cachedit_fx.runtime.layout.request_rows`).

    Returns:
        ``(branch, step)``: the call's branch, shape (1,), and its 0-dim 0-based step in that branch.
    """
    branch = _start_of_request_or_context(layout, st, timestep, latent)
    st["calls_total"].add_(1)
    calls = st["calls"].index_select(0, branch) + 1
    st["calls"].index_copy_(0, branch, calls)
    return branch, calls[0] - 1


def store_rows(tensors, branch, rows) -> None:
    """Write the rows a cond branch returned into the branch's entry of each state tensor: one row
    after a computed step, none after a cached one (the two branches return different lengths)."""
    for tensor, row in zip(tensors, rows):
        n = row.shape[0]
        torch._check(n <= 1)
        tensor.index_copy_(0, branch.expand(n), row)


def _decide(layout: ChainLayout, st: dict, step, branch, fn_res):
    """The indicator's decision for this call: (use_cache, gate, recorded) per slot, and the branch's
    selected counters."""
    names = ["has_ref", "cached_count", "run", "acc_diff", "ladder_len", "last_computed"]
    if layout.indicator == "magcache":
        names += ["mag_acc_ratio", "mag_acc_err", "mag_acc_steps"]
    sel = {n: branch_entry(layout, st[n], branch) for n in names}
    limits = (sel["cached_count"], sel["run"], sel["acc_diff"], st["params"], st["mask"])
    if layout.indicator == "magcache":  # the decision reads no activations (the Fn residual is empty)
        use_cache, gate, recorded, after = decide_magcache(
            step, sel["has_ref"], *limits, st["mag_params"], st["mag_ratios"], sel["mag_acc_ratio"],
            sel["mag_acc_err"], sel["mag_acc_steps"], layout.records_ratios)
        for name, value in zip(("mag_acc_ratio", "mag_acc_err", "mag_acc_steps"), after):
            _write(st[name], branch, value)
        return use_cache, gate, recorded, sel
    diff = relative_l1(branch_entry(layout, st["ref"], branch), fn_res, layout.slots, layout.group)
    if layout.diff_shared:
        second = branch == 1
        diff = torch.where(second, st["shared_diff"], diff)
        st["shared_diff"].copy_(torch.where(second, st["shared_diff"], diff))
    use_cache, gate, recorded = decide(step, diff, sel["has_ref"], *limits, rule=layout.indicator)
    return use_cache, gate, recorded, sel


def pre_step(layout: ChainLayout, fn_res, timestep, latent, *state):
    """Start a call: clear the state at a new request or context, advance the branch's step, decide.
    ``timestep`` and ``latent`` (the call's inputs, each may be None) tell requests apart.

    Returns a :class:`PreStep`.
    """
    st = _state(layout, state)
    branch, step = begin_call(layout, st, timestep, latent)
    use_cache, gate, recorded, sel = _decide(layout, st, step, branch, fn_res)
    if layout.group is not None:  # a rank that computes makes all compute: the middle's collectives match
        use_cache = across_ranks(use_cache.to(torch.int32), layout.group, "min") > 0
    distance = (step - sel["last_computed"]).to(torch.float32)
    return PreStep(use_cache.all(), use_cache, gate, recorded, step, branch, sel["ladder_len"], distance)


def _counters(layout: ChainLayout, branch, ladder_len, distance, step, history_states) -> Counters:
    """The branch's counters a forecast or update reads (DMD's from ``history_states``, the state's
    ``layout.history_names()``)."""
    extra = [branch_entry(layout, t, branch) for t in history_states]
    return Counters(ladder_len, distance, step, *extra)


def forecast(layout: ChainLayout, passthrough, counters: Counters, ladders):
    """What a cached step produces for each middle output: the forecast value itself for an absolute
    stream, else the blocks-skipped value plus the forecast residual; and each stream's history after
    it. ``ladders``: the call's branch's history per stream."""
    out, hists = [], []
    for spec, base, ladder in zip(layout.streams, passthrough, ladders):
        approx, hist = calibrators.forecast(layout.calibrator, spec, ladder, counters)
        approx = approx.to(base.dtype)
        out.append(approx if spec.absolute else base + approx)
        hists.append(hist)
    return out, hists


def _logged_ratio(layout: ChainLayout, values, ladders, ladder_len):
    """MagCache's calibration: mean over tokens of |r_t| / (|r_{t-1}| + 1e-8) for the H residual, norms
    over the last dim in float32 (1.0 with no previous one), per slot; () unless the layout records it."""
    if not layout.records_ratios:
        return ()
    k = next(i for i, spec in enumerate(layout.streams) if spec.role == "H")
    prev = calibrators.last_value(layout.calibrator, layout.streams[k], ladders[k])
    cur = torch.linalg.vector_norm(values[k].float(), dim=-1)
    ratio = (cur / (torch.linalg.vector_norm(prev.float(), dim=-1) + 1e-8)).reshape(layout.slots, -1).mean(1)
    return (torch.where(ladder_len > 0, ratio, torch.ones_like(ratio)),)


def _no_ratio(layout: ChainLayout, device) -> tuple:
    return (torch.full((layout.slots,), math.nan, device=device),) if layout.records_ratios else ()


def cached_step(layout: ChainLayout, passthrough, branch, ladder_len, distance, ref_state, ladder_states,
                history_states=()) -> BranchOut:
    """The cond's cached branch: the forecast middle outputs, and the rows of the histories a cached
    step stores (FoCa's), none of the others. ``ref_state`` / ``ladder_states`` / ``history_states``:
    the chain's ``ref``, ``ladder_k`` and ``layout.history_names()`` state tensors (every branch's rows;
    the empty rows take their sizes, symbolic ones in a dynamic-shape export)."""
    ladders = [branch_entry(layout, t, branch) for t in ladder_states]
    counters = _counters(layout, branch, ladder_len, distance, None, history_states)
    outs, hists = forecast(layout, passthrough, counters, ladders)
    rows = [ref_state.new_empty((0, *ref_state.shape[1:]))]
    rows += [hist.unsqueeze(0) if calibrators.writes_on_cache(spec) else t.new_empty((0, *t.shape[1:]))
             for spec, hist, t in zip(layout.streams, hists, ladder_states)]
    finite = torch.ones(layout.slots, dtype=torch.bool, device=ref_state.device)
    return BranchOut(tuple(outs), finite, tuple(rows), _no_ratio(layout, ref_state.device))


def computed_step(layout: ChainLayout, use_cache, step, branch, ladder_len, distance, fn_res, outs, passthrough,
                  ref_state, ladder_states, history_states=()) -> BranchOut:
    """The cond's full branch after the middle ran: the new reference and history rows of the call's
    branch (per-sample mode: a slot that is cached keeps its rows, or takes its forecast's, and takes
    the forecast)."""
    ladders = [branch_entry(layout, t, branch) for t in ladder_states]
    counters = _counters(layout, branch, ladder_len, distance, step, history_states)
    mixed, after_forecast = list(outs), ladders
    if layout.slots > 1:
        approx, after_forecast = forecast(layout, passthrough, counters, ladders)
        mixed = [torch.where(slot_view(use_cache, o), a, o) for a, o in zip(approx, outs)]
    # A non-finite residual (a NaN or inf step) enters neither the reference nor the histories.
    values = [(out if spec.absolute else out - base) for spec, out, base in zip(layout.streams, outs, passthrough)]
    finite = all_finite([fn_res, *values], layout.slots, layout.group)
    kept = ~use_cache & finite
    ref = branch_entry(layout, ref_state, branch)
    if layout.indicator == "magcache":  # no Fn: nothing to compare against
        rows = [ref_state.new_empty((0, *ref_state.shape[1:]))]
    else:
        rows = [torch.where(slot_view(kept, ref), fn_res.to(ref.dtype), ref).unsqueeze(0)]
    for spec, value, ladder, other in zip(layout.streams, values, ladders, after_forecast):
        fresh = calibrators.update(layout.calibrator, spec, ladder, counters, value.to(ladder.dtype))
        slot = slot_view(kept, fresh[0]).unsqueeze(0)
        rows.append(torch.where(slot, fresh, other).unsqueeze(0))
    return BranchOut(tuple(mixed), finite, tuple(rows), _logged_ratio(layout, values, ladders, ladder_len))


def post_step(layout: ChainLayout, pre: PreStep, finite, rows, *state, logged=()) -> None:
    """Finish a call: write the rows a step made (reference, histories), update the counters and the
    logs (``logged``: MagCache calibration's ratio)."""
    st = _state(layout, state)
    branch = pre.branch
    # The state is untouched between pre_step and here (the cond only reads it): pre's selections hold.
    sel = {n: branch_entry(layout, st[n], branch) for n in ("cached_count", "run", "last_computed", "has_ref", "acc_diff",
                                                       *layout.history_names(), "ladder_len")}
    store_rows([st[name] for name in layout.stored_names()], branch, rows)
    counters = commit(pre.use_cache, finite, pre.step, pre.recorded,
                      **{k: sel[k] for k in ("cached_count", "run", "last_computed", "has_ref", "acc_diff")})
    computed = ~pre.use_cache
    counters.update(calibrators.commit_history(layout.calibrator.kind, layout.ladder, computed & finite, computed,
                                               pre.step, sel["ladder_len"], *(sel[n] for n in layout.history_names())))
    for name, value in counters.items():
        _write(st[name], branch, value)
    at = pre.step.clamp(0, layout.capacity - 1).reshape(1)
    logs = [("diff_log", pre.recorded.float()), ("gate_log", pre.gate), ("cached_log", pre.use_cache)]
    logs += list(zip(["ratio_log"], logged))
    for name, value in logs:
        st[name].index_put_((branch, at), value.unsqueeze(0))  # one element per slot, not the whole row
