"""``steps_mask``: a ``steps_computation_mask`` from compute / cache bins, or from cache-dit's presets
("slow", "medium", "fast", "ultra"), giving the same masks as cache-dit 1.5.3 for every step count.

The presets are written for 28 steps and fitted to other counts: trimmed from the end for fewer steps,
grown bin by bin (in proportion to the count) for more; distilled step counts (4, 6, 8 to 15) have
presets of their own. A preset mask always computes its last step. ``block_range``: cache-dit's list of
block ids (the blocks DBPrune never prunes).
"""
from __future__ import annotations

from itertools import zip_longest
from typing import Sequence

from ..errors import ConfigError

Bins = tuple[list[int], list[int]]  # compute bins, cache bins

MASK_POLICIES = ("slow", "medium", "fast", "ultra")
# policy: (compute bins, cache bins)
_FOR_28 = {"slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)), "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
           "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)), "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7))}
_FOR_8 = {"slow": ((5, 1, 1), (1,)), "medium": ((4, 1, 1), (1, 1)), "fast": ((3, 1, 1), (1, 2)),
          "ultra": ((2, 1, 1), (2, 2))}
_FOR_9 = {"slow": ((5, 2, 1), (1,)), "medium": ((5, 1, 1), (1, 1)), "fast": ((4, 1, 1), (1, 2)),
          "ultra": ((3, 1, 1), (2, 2))}
_FOR_10_TO_15 = {"slow": ((4, 2, 2, 2, 1), (1, 1, 1, 1)), "medium": ((4, 2, 1, 1, 1), (1, 1, 2, 2)),
                 "fast": ((3, 1, 1, 1, 1), (1, 2, 2, 3)), "ultra": ((2, 1, 1, 1, 1), (1, 2, 3, 3))}
_FOR_FEW = {4: ((2, 1), (1,)), 6: ((3, 1), (2,))}  # every policy


def _total(bins: Bins) -> int:
    return sum(bins[0]) + sum(bins[1])


def _trim(bins: Bins, steps: int) -> Bins:
    """Shorten the last cache bin, then the last compute bin, in turn, until the bins cover ``steps``."""
    compute, cache = bins
    while _total(bins) > steps:
        for side in (cache, compute):
            if side:
                side[-1] -= 1
                if side[-1] == 0:
                    side.pop()
            if _total(bins) <= steps:
                break
    return bins


def _grow(bins: Bins, steps: int) -> Bins:
    """Lengthen each (compute, cache) pair of bins in turn by half its 28-step length scaled to ``steps``
    (at least 1), and the last compute bin by one after every round, until the bins cover ``steps``."""
    compute, cache = bins
    base = (list(compute), list(cache))
    scale = steps / 28 * 0.5
    while True:
        for i in range(min(len(compute), len(cache))):
            for side, start in ((compute, base[0]), (cache, base[1])):
                side[i] += max(int(start[i] * scale), 1)
                if _total(bins) >= steps:
                    return bins
        compute[-1] += 1
        if _total(bins) >= steps:
            return bins


def _preset(policy: str, steps: int) -> Bins:
    if steps < 8:
        if steps not in _FOR_FEW:
            raise ConfigError(f"steps_mask: total_steps must be 4, 6 or >= 8 for a mask_policy preset, got {steps} "
                              "(give compute_bins and cache_bins instead)")
        compute, cache = _FOR_FEW[steps]
    else:
        table = _FOR_8 if steps == 8 else _FOR_9 if steps == 9 else _FOR_10_TO_15 if steps < 16 else _FOR_28
        compute, cache = table[policy]
    bins = (list(compute), list(cache))
    if steps > 28:
        bins = _grow(bins, steps)
    return _trim(bins, steps)


def _interleave(compute: Sequence[int], cache: Sequence[int], steps: int | None) -> list[int]:
    covered = sum(compute) + sum(cache)
    if steps is None:
        steps = covered
    elif covered < steps:
        raise ConfigError(f"steps_mask: compute_bins and cache_bins cover {covered} steps, fewer than "
                          f"total_steps={steps}")
    mask: list[int] = []
    for c, k in zip_longest(compute, cache, fillvalue=0):
        mask += [1] * c + [0] * k
    return mask[:steps]


def steps_mask(compute_bins: Sequence[int] | None = None, cache_bins: Sequence[int] | None = None,
               total_steps: int | None = None, mask_policy: str | None = "medium") -> list[int]:
    """A ``steps_computation_mask``: 1 = compute the step, 0 = cache it (or decide, with the dynamic policy).

    Args:
        compute_bins, cache_bins: runs of computed and cached steps, alternating, compute first
            (``[4, 2], [3]`` -> ``1111 000 11``). Both given: they define the mask.
        total_steps: the mask's length (the bins are cut to it; they must cover it). Needed for presets.
        mask_policy: a preset, one of ``MASK_POLICIES``, used when the bins are not both given.

    Returns:
        The mask, a list of 0 and 1.
    """
    if compute_bins is not None and cache_bins is not None:
        return _interleave(compute_bins, cache_bins, total_steps)
    if mask_policy not in MASK_POLICIES:
        raise ConfigError(f"steps_mask: mask_policy must be one of {MASK_POLICIES}, got {mask_policy!r}")
    if total_steps is None:
        raise ConfigError("steps_mask: a mask_policy preset needs total_steps (or give compute_bins and cache_bins)")
    mask = _interleave(*_preset(mask_policy, total_steps), total_steps)
    mask[-1] = 1
    return mask


def block_range(start: int, end: int, step: int = 1) -> list[int]:
    """cache-dit's block ids for ``DBPruneConfig.non_prune_block_ids``: every ``step``-th id of
    ``range(start, end)`` plus the first and last block, sorted; ``[]`` when ``start > end``, ``end <= 0``
    or ``step <= 1`` (cache-dit returns nothing for its default step)."""
    if start > end or end <= 0 or step <= 1:
        return []
    return sorted({0, *range(start, end, step), end - 1})
