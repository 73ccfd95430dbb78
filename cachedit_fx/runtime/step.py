"""The per-call glue around the ``torch.cond``: read state, decide, and write state back.

The rewritten graph calls :func:`pre_step` before the cond, :func:`cached_step` or
:func:`computed_step` inside its branches and :func:`post_step` after it. All are composed from the
pure functions in :mod:`cachedit_fx.runtime.algorithm`. The branches only compute: what a computed step stores
(reference, TaylorSeer ladders) leaves the cond as rows, one per store after a computed step and none
after a cached one, and :func:`post_step` writes them (``index_copy_`` into caller-owned tensors,
outside the cond, where AOTAutograd keeps them as input mutations and Inductor turns them into
in-place kernels). A cached call so reads and writes no activation-sized state beyond the diff's
reference and the ladder it forecasts from.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .algorithm import across_ranks, all_finite, commit, decide, relative_l1, slot_view, taylor_approx, taylor_update
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
    # The branch's new reference and ladder rows, ``(1, ...)`` each after a computed step and ``(0, ...)``
    # after a cached one: post_step writes the rows there are, so a cached step writes none.
    rows: tuple[torch.Tensor, ...]

    def flat(self) -> tuple[torch.Tensor, ...]:
        """The tensors in the order a cond branch returns them."""
        return (*self.outs, self.finite, *self.rows)


def _select(layout: ChainLayout, tensor, branch):
    # With one branch a view is enough; with two, gather the branch on device (no host read).
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
    a step as long as this one or the last, whichever is longer), or after a gap of over twice the last
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
        out_of_rate = (rate > 0) & (change > RATE_JUMP * rate * torch.maximum(step, last_dt))
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


def pre_step(layout: ChainLayout, fn_res, timestep, latent, *state):
    """Start a call: clear the state at a new request or context, advance the branch's step, decide.
    ``timestep`` and ``latent`` (the call's inputs, each may be None) tell requests apart.

    Returns a :class:`PreStep`.
    """
    st = _state(layout, state)
    branch, step = begin_call(layout, st, timestep, latent)
    slots = layout.slots
    diff = relative_l1(_select(layout, st["ref"], branch), fn_res, slots, layout.group)
    if layout.diff_shared:
        second = branch == 1
        diff = torch.where(second, st["shared_diff"], diff)
        st["shared_diff"].copy_(torch.where(second, st["shared_diff"], diff))
    sel = {n: _select(layout, st[n], branch) for n in ("has_ref", "cached_count", "run", "acc_diff",
                                                       "ladder_len", "last_computed")}
    use_cache, gate, recorded = decide(step, diff, sel["has_ref"], sel["cached_count"], sel["run"],
                                       sel["acc_diff"], st["params"], st["mask"])
    if layout.group is not None:  # a rank that computes makes all compute: the middle's collectives match
        use_cache = across_ranks(use_cache.to(torch.int32), layout.group, "min") > 0
    distance = (step - sel["last_computed"]).to(torch.float32)
    return PreStep(use_cache.all(), use_cache, gate, recorded, step, branch, sel["ladder_len"], distance)


def forecast(layout: ChainLayout, passthrough, ladder_len, distance, ladders):
    """What a cached step produces for each middle output: the (TaylorSeer-forecast) value itself for
    an absolute stream, else the blocks-skipped value plus the forecast residual. ``ladders``: the
    call's branch's ladder per stream."""
    out = []
    for spec, base, ladder in zip(layout.streams, passthrough, ladders):
        approx = taylor_approx(ladder, ladder_len, distance).to(base.dtype)
        out.append(approx if spec.absolute else base + approx)
    return out


def cached_step(layout: ChainLayout, passthrough, branch, ladder_len, distance, ref_state, ladder_states) -> BranchOut:
    """The cond's cached branch: the forecast middle outputs, and no state rows to write.
    ``ref_state`` / ``ladder_states``: the chain's ``ref`` and ``ladder_k`` state tensors (every
    branch's rows; the empty rows take their sizes, symbolic ones in a dynamic-shape export)."""
    ladders = [_select(layout, t, branch) for t in ladder_states]
    outs = forecast(layout, passthrough, ladder_len, distance, ladders)
    rows = tuple(t.new_empty((0, *t.shape[1:])) for t in (ref_state, *ladder_states))
    return BranchOut(tuple(outs), torch.ones(layout.slots, dtype=torch.bool, device=ref_state.device), rows)


def computed_step(layout: ChainLayout, use_cache, step, branch, ladder_len, distance, fn_res, outs, passthrough,
                  ref_state, ladder_states) -> BranchOut:
    """The cond's full branch after the middle ran: the new reference and ladder rows of the call's
    branch (per-sample mode: a slot that is cached keeps its rows and takes the forecast)."""
    ladders = [_select(layout, t, branch) for t in ladder_states]
    mixed = list(outs)
    if layout.slots > 1:
        approx = forecast(layout, passthrough, ladder_len, distance, ladders)
        mixed = [torch.where(slot_view(use_cache, o), a, o) for a, o in zip(approx, outs)]
    # A non-finite residual (a NaN or inf step) enters neither the reference nor the ladders.
    values = [(out if spec.absolute else out - base) for spec, out, base in zip(layout.streams, outs, passthrough)]
    finite = all_finite([fn_res, *values], layout.slots, layout.group)
    kept = ~use_cache & finite
    ref = _select(layout, ref_state, branch)
    rows = [torch.where(slot_view(kept, ref), fn_res.to(ref.dtype), ref).unsqueeze(0)]
    for value, ladder in zip(values, ladders):
        fresh = taylor_update(ladder, ladder_len, value.to(ladder.dtype), distance, step)
        rows.append(torch.where(slot_view(kept, fresh[0]).unsqueeze(0), fresh, ladder).unsqueeze(0))
    return BranchOut(tuple(mixed), finite, tuple(rows))


def post_step(layout: ChainLayout, pre: PreStep, finite, rows, *state) -> None:
    """Finish a call: write the rows a computed step made (reference, ladders), update the counters
    and the logs."""
    st = _state(layout, state)
    branch = pre.branch
    # The state is untouched between pre_step and here (the cond only reads it): pre's selections hold.
    sel = {n: _select(layout, st[n], branch) for n in ("cached_count", "run", "ladder_len", "last_computed",
                                                       "has_ref", "acc_diff")}
    store_rows([st[name] for name in layout.stored_names()], branch, rows)
    for name, value in commit(pre.use_cache, finite, pre.step, pre.recorded, layout.ladder, **sel).items():
        _write(st[name], branch, value)
    at = pre.step.clamp(0, layout.capacity - 1).reshape(1)
    for name, value in (("diff_log", pre.recorded.float()), ("gate_log", pre.gate), ("cached_log", pre.use_cache)):
        st[name].index_put_((branch, at), value.unsqueeze(0))  # one element per slot, not the whole row
