"""The static layout of a DBPrune chain's state: the state table of :func:`~.layout.request_rows` (requests,
CFG branches, call and pruned-step counters) followed by the per-call and per-block state of
docs/algorithm.md's "DBPrune": each prunable block's H input at its last computed step (the reference
its diff is taken against) and its output residuals, per CFG branch.

Shapes: ``nb`` CFG branches, ``M`` prunable blocks, ``CAP`` logged steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import DBCacheConfig, SeparateCFG
from .layout import LOG_CAPACITY, PARAM_INDEX, BranchBy, Clear, StateField, cfg_branches, params_from_config, \
    request_rows

# The DBPrune numbers loaded into the ``prune_params`` state tensor (no recompile when they change).
PRUNE_PARAM_NAMES = ("dynamic", "relax_ratio", "max_dynamic")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class PrunedBlock:
    """One prunable block: its index in the chain, its H input, and the values it hands on (shape and
    dtype of each, in the order the rewritten graph passes them)."""

    index: int
    h_shape: Shape
    h_dtype: torch.dtype
    outputs: tuple[tuple[Shape, torch.dtype], ...]


@dataclass(frozen=True)
class PruneLayout:
    """The compile-time facts of one DBPrune chain's state."""

    n_branches: int
    n_blocks: int  # the chain's length (cache-dit's actual_blocks per call)
    blocks: tuple[PrunedBlock, ...]
    # The branch whose recorded diffs of the step set the dynamic threshold: cache-dit reads its non-CFG
    # branch's (branch 0, or 1 with cfg_compute_first), on CFG calls too.
    threshold_source: int = 0
    branch_by: BranchBy = BranchBy.PARITY
    capacity: int = LOG_CAPACITY
    latent_shape: Shape | None = None
    latent_dtype: torch.dtype = torch.float32
    slots: int = 1  # one decision per block and call (cache-dit has no per-sample pruning)
    group: str | None = None  # DBPrune runs in one process (cache-dit refuses context parallelism too)

    def fields(self) -> list[StateField]:
        """The state table, in the order the graph takes the tensors. A block's reference and residuals
        keep their values when cleared on device: ``block_has_ref`` says they are stale."""
        nb, m, cap, f32 = self.n_branches, len(self.blocks), self.capacity, torch.float32
        never, context = Clear.NEVER, Clear.CONTEXT
        table = request_rows(self) + [
            # name             shape                       dtype        reset()    cleared on device by
            ("prune_params",   (len(PRUNE_PARAM_NAMES),),  torch.float64, None,    never),
            ("pruned_now",     (nb,),                      torch.int64, 0,         context),
            ("step_diffs",     (nb, m),                    f32,         math.nan,  context),
            ("step_recorded",  (nb, m),                    torch.bool,  False,     context),
            ("block_has_ref",  (nb, m),                    torch.bool,  False,     context),
            ("pruned_log",     (nb, cap),                  torch.int32, 0,         context),
            ("block_diff_log", (nb, cap, m),               f32,         math.nan,  context),
            ("block_gate_log", (nb, cap, m),               torch.int8,  0,         context),
        ]
        for k, block in enumerate(self.blocks):
            table.append((f"block_ref_{k}", (nb, *block.h_shape), block.h_dtype, 0.0, never))
            table += [(f"block_res_{k}_{i}", (nb, *shape), dtype, 0.0, never)
                      for i, (shape, dtype) in enumerate(block.outputs)]
        return [StateField(*row) for row in table]

    def names(self) -> list[str]:
        return [f.name for f in self.fields()]

    def stored_names(self, k: int) -> list[str]:
        """What a computed step of prunable block ``k`` stores and a pruned one reads: its reference,
        then one residual per value it hands on (the order of the rows its cond returns)."""
        return [f"block_ref_{k}", *(f"block_res_{k}_{i}" for i in range(len(self.blocks[k].outputs)))]

    def configured(self, cache_config: DBCacheConfig) -> dict[str, list]:
        """The values of the fields a config loads: DBCache's request-level numbers (the threshold is the
        prune threshold; DBPrune never accumulates diffs, so that gate is off) and DBPrune's own."""
        params, mask = params_from_config(cache_config)
        params[PARAM_INDEX["max_accumulated"]] = 0.0
        cap = getattr(cache_config, "max_dynamic_prune_threshold", None)
        values = dict(dynamic=float(getattr(cache_config, "enable_dynamic_prune_threshold", False)),
                      relax_ratio=getattr(cache_config, "dynamic_prune_threshold_relax_ratio", 1.25),
                      max_dynamic=math.nan if cap is None else cap)
        return {"params": params, "mask": mask, "prune_params": [float(values[n]) for n in PRUNE_PARAM_NAMES]}

    @property
    def block_indices(self) -> list[int]:
        return [b.index for b in self.blocks]


def prune_layout(blocks: list[PrunedBlock], n_blocks: int, cache: DBCacheConfig, separate: SeparateCFG,
                 sees_timestep: bool, latent: tuple[Shape, torch.dtype] | None = None) -> PruneLayout:
    """The layout of a DBPrune chain of ``n_blocks`` blocks whose prunable ones are ``blocks``; ``latent``:
    the call's latent input, when the chain tells requests apart by it. The graph path and the eager
    cache both build it here."""
    n_branches, branch_by = cfg_branches(separate, sees_timestep)
    source = 1 if n_branches == 2 and cache.cfg_compute_first else 0
    return PruneLayout(n_branches=n_branches, n_blocks=n_blocks, blocks=tuple(blocks), threshold_source=source,
                       branch_by=branch_by, latent_shape=tuple(latent[0]) if latent is not None else None,
                       latent_dtype=latent[1] if latent is not None else torch.float32)
