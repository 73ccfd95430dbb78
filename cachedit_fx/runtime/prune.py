"""DBPrune (docs/algorithm.md, "DBPrune") as pure tensor functions, and the per-block glue around each
prunable block's ``torch.cond``.

The rewritten graph (and the eager cache) calls :func:`begin` once per call, before the first prunable
block, then for every prunable block ``k``: :func:`block_pre` (the decision, which also updates every
counter and log: they depend on the decision alone), the cond of :func:`pruned_block` (the block skipped:
its input plus its last residual) or :func:`computed_block` (the block ran: the rows it stores), and
:func:`block_post` (writes those rows outside the cond, as ``step.post_step`` does). A block's decision
reads its *own* input, which depends on the decisions of the blocks before it in the same call, so each
prunable block needs its own cond. :func:`masked_block` is the alternative that runs every block and
selects (no cond, no host read, no saving), kept for the measurement in ``benchmarks/prune_forms.py``.

No ``.item()``, no Python branching on tensor values. Shapes: ``M`` prunable blocks; ``call`` is the
(2,) int64 tensor ``[branch, step]`` that :func:`begin` returns.
"""
from __future__ import annotations

import math

import torch

from .algorithm import decide, relative_l1
from .layout import PARAM_INDEX, param
from .prune_layout import PRUNE_PARAM_NAMES, PruneLayout
from .step import begin_call, branch_entry, store_rows

MAX_THRESHOLD_DIFFS = 5  # cache-dit averages the first five diffs recorded in the step


def dynamic_threshold(threshold, prune_params, diffs, recorded):
    """cache-dit's ``PrunedContext.get_residual_diff_threshold``: with the dynamic threshold on, the mean of
    the positive ones among the first five diffs recorded so far in the step, times the relax ratio, when
    that is below the cap (``max_dynamic_prune_threshold``, or twice the threshold) and above the
    threshold; the threshold otherwise.

    Args:
        threshold: 0-dim float64, ``residual_diff_threshold``.
        prune_params: (3,) float64 in ``PRUNE_PARAM_NAMES`` order (max_dynamic NaN: None).
        diffs: (M,) the step's recorded diffs by prunable block; ``recorded``: (M,) which were recorded.

    Returns:
        0-dim float64, the threshold of the next prunable block.
    """
    p = dict(zip(PRUNE_PARAM_NAMES, prune_params.unbind(0)))
    first = recorded & (torch.cumsum(recorded.long(), 0) <= MAX_THRESHOLD_DIFFS)
    d = diffs.double()
    used = first & (d > 0)
    # cumsum adds left to right, as Python's sum() over the list does (the zeros between add nothing)
    total = torch.cumsum(torch.where(used, d, torch.zeros_like(d)), 0)[-1]
    count = used.sum()
    relaxed = total / count.clamp(min=1) * p["relax_ratio"]
    cap = torch.where(torch.isnan(p["max_dynamic"]), 2 * threshold, p["max_dynamic"])
    take = (p["dynamic"] > 0) & (count > 0) & (relaxed < cap)
    return torch.where(take, torch.maximum(relaxed, threshold), threshold)


def block_decision(step, diff, has_ref, cached_count, run, pruned_now, threshold, params, mask):
    """cache-dit's ``can_prune`` for one block: docs/algorithm.md's gates (``decide``) with the block's
    threshold. ``cached_count`` counts the steps that pruned, this one included once a block before
    pruned in it; the continuous run excludes this step (cache-dit subtracts it), hence ``run - 1`` then.

    Returns:
        ``(prune, gate, recorded_diff)``, each (1,).
    """
    index = torch.arange(params.shape[0], device=params.device)
    here = torch.where(index == PARAM_INDEX["threshold"], threshold, params)
    continuous = run - (pruned_now > 0).long()
    return decide(step, diff, has_ref, cached_count, continuous, torch.zeros_like(diff, dtype=torch.float64),
                  here, mask)


def _state(layout: PruneLayout, state) -> dict:
    return dict(zip(layout.names(), state))


def begin(layout: PruneLayout, timestep, latent, *state) -> torch.Tensor:
    """Start a call: a new request or context clears the state (``step.begin_call``), the call counts in
    its branch, the continuous run of pruned steps ends unless the branch's previous step pruned, and
    this call's per-block scratch is cleared.

    Returns:
        ``[branch, step]``, (2,) int64.
    """
    st = _state(layout, state)
    branch, step = begin_call(layout, st, timestep, latent)
    pruned_before = st["pruned_now"].index_select(0, branch)
    run = st["run"].index_select(0, branch)
    st["run"].index_copy_(0, branch, torch.where(pruned_before.unsqueeze(1) > 0, run, torch.zeros_like(run)))
    st["pruned_now"].index_copy_(0, branch, torch.zeros_like(pruned_before))
    st["step_diffs"].index_copy_(0, branch, torch.full_like(st["step_diffs"][:1], math.nan))
    st["step_recorded"].index_copy_(0, branch, torch.zeros_like(st["step_recorded"][:1]))
    return torch.cat([branch, step.reshape(1)])


def block_pre(layout: PruneLayout, k: int, x_h, call, *state) -> torch.Tensor:
    """Decide prunable block ``k`` from its input ``x_h`` and record the decision: the step's diffs,
    the pruned-step counters (the first block pruned in a step counts the step), the logs, and that
    a computed block leaves a reference.

    Returns:
        The 0-dim bool the block's cond reads: prune it.
    """
    st = _state(layout, state)
    branch, step = call[:1], call[1]
    diff = relative_l1(branch_entry(layout, st[f"block_ref_{k}"], branch), x_h, 1)
    source = layout.threshold_source
    current = st["calls"][source] - 1 == step  # the source branch has run this step (always: its own)
    threshold = dynamic_threshold(param(st["params"], "threshold")[0], st["prune_params"], st["step_diffs"][source],
                                  st["step_recorded"][source] & current)
    kk = torch.full_like(branch, k)
    has_ref = st["block_has_ref"].index_select(0, branch)[:, k]
    cached, run = st["cached_count"].index_select(0, branch)[0], st["run"].index_select(0, branch)[0]
    pruned = st["pruned_now"].index_select(0, branch)
    prune, gate, recorded = block_decision(step, diff, has_ref, cached, run, pruned, threshold, st["params"],
                                           st["mask"])
    first = (prune & (pruned == 0)).long()
    st["cached_count"].index_copy_(0, branch, (cached + first).unsqueeze(0))
    st["run"].index_copy_(0, branch, (run + first).unsqueeze(0))
    st["pruned_now"].index_copy_(0, branch, pruned + prune.long())
    st["block_has_ref"].index_put_((branch, kk), has_ref | ~prune)
    was_recorded = gate >= 8  # gates 8 (threshold >= 1: -1) and 9 (the diff test) record a diff
    st["step_diffs"].index_put_((branch, kk), recorded.float())
    st["step_recorded"].index_put_((branch, kk), was_recorded)
    at = step.clamp(0, layout.capacity - 1).reshape(1)
    st["block_diff_log"].index_put_((branch, at, kk), recorded.float())
    st["block_gate_log"].index_put_((branch, at, kk), gate)
    st["pruned_log"].index_put_((branch, at), (pruned + prune.long()).int())
    return prune[0]


def pruned_block(layout: PruneLayout, bases, branch, stored) -> tuple[torch.Tensor, ...]:
    """The cond's branch for a pruned block: each value it hands on is the value it took plus its
    residual at its last computed step; no rows to store. ``stored``: the block's reference and
    residual state tensors (``PruneLayout.stored_names``)."""
    outs = [base + branch_entry(layout, res, branch) for base, res in zip(bases, stored[1:])]
    rows = [t.new_empty((0, *t.shape[1:])) for t in stored]
    return (*outs, *rows)


def computed_block(x_h, outs, bases) -> tuple[torch.Tensor, ...]:
    """The cond's branch for a computed block, after the block ran: its outputs, then the rows it
    stores: its H input (the next step's reference) and each output's residual."""
    rows = [x_h.unsqueeze(0), *((out - base).unsqueeze(0) for out, base in zip(outs, bases))]
    return (*outs, *rows)


def masked_block(layout: PruneLayout, prune, x_h, outs, bases, branch, stored) -> tuple[torch.Tensor, ...]:
    """The block ran whatever the decision; a pruned block's values are selected from its residuals, and
    its stored rows are kept (the same result as the cond, without saving the block's work)."""
    skipped = pruned_block(layout, bases, branch, stored)[:len(outs)]
    fresh = computed_block(x_h, outs, bases)[len(outs):]
    kept = [torch.where(prune, old.unsqueeze(0).to(new.dtype), new) for old, new in
            zip((branch_entry(layout, t, branch) for t in stored), fresh)]
    return (*(torch.where(prune, s, o) for s, o in zip(skipped, outs)), *kept)


def block_post(call, rows, *stored) -> None:
    """After block ``k``'s cond: write the rows a computed block returned (none after a pruned one)."""
    store_rows(stored, call[:1], rows)
