"""The cachedit pass pipeline, one entry for every caller (the backend, export, the graph report):

    find chains (blocks.py) -> classify (patterns.py) -> pick -> split (split.py) -> rewrite (rewrite.py)
    -> sink (sink.py)

The analyses return data; the rewrite and the sink are the transforms, applied to a copy of the graph,
so a graph the passes cannot handle comes back untouched with the reason (``PassResult.unmatched``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from ..config import ChainPolicy, DBCacheConfig, SeparateCFG, TaylorSeerCalibratorConfig
from ..errors import NoCacheableChain
from ..fx_utils import clone_graph_module
from ..state import BranchBy
from .patterns import ChainInfo, Unmatched, analyze
from .pin import PinnedList, pin_chain
from .blocks import timestep_input
from .parallel import sequence_group
from .rewrite import RewrittenChain, rewrite
from .sink import sink_into_branches
from .split import split_chain

__all__ = ["PassResult", "PassSettings", "PinnedList", "apply"]


@dataclass(frozen=True)
class PassSettings:
    """What the passes need to know: the cache structure (Fn/Bn, TaylorSeer order, per-sample), how
    calls map to CFG branches, which chains to cache (or the one a BlockAdapter pins), and where the
    state lives."""

    cache_config: DBCacheConfig
    calibrator_config: TaylorSeerCalibratorConfig | None = None
    separate_cfg: SeparateCFG = SeparateCFG.OFF
    chains: ChainPolicy = ChainPolicy.LONGEST
    device: torch.device | None = None
    pinned: tuple[PinnedList, ...] = ()
    group: str | None = None  # the process group sharding the sequence, by name; None: found from the graph


@dataclass
class PassResult:
    """The graph after the passes: the rewritten copy and its chains, or the input graph and why
    nothing was rewritten."""

    graph_module: GraphModule
    chains: list[RewrittenChain] = field(default_factory=list)
    unmatched: str | None = None
    # nodes of the graph moved into a cond branch, the only one that needs them (sink.py)
    moved_into_branches: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return self.unmatched is None


def cfg_branches(gm: GraphModule, separate: SeparateCFG) -> tuple[int, BranchBy]:
    """State sets per chain and how a call picks one. AUTO tells a CFG pair's second call by its repeated
    timestep, on device; a graph that does not see the timestep (one after a graph break, e.g. Lumina2's)
    keeps one set: cond and uncond calls usually differ in text length there and compile to graphs of
    their own, each with its own state."""
    if separate is SeparateCFG.ON:
        return 2, BranchBy.PARITY
    if separate is SeparateCFG.AUTO and timestep_input(gm) is not None:
        return 2, BranchBy.TIMESTEP
    return 1, BranchBy.PARITY


def pick_chains(gm: GraphModule, found: list[ChainInfo], settings: PassSettings) -> list[ChainInfo]:
    if settings.pinned:
        return [pin_chain(gm, found, settings.pinned)]
    return found[:1] if settings.chains is ChainPolicy.LONGEST else found


def apply(gm: GraphModule, settings: PassSettings) -> PassResult:
    """Run the pipeline on a copy of ``gm``.

    Args:
        gm: a Dynamo graph of a transformer's forward (left unchanged).
        settings: the structure to compile in.

    Returns:
        A :class:`PassResult`.

    Raises:
        ConfigError: ``Fn_compute_blocks`` / ``Bn_compute_blocks`` do not fit the chain, or a pinned chain
            contradicts the graph.
    """
    work = clone_graph_module(gm)
    found = analyze(work)
    if isinstance(found, Unmatched):
        return PassResult(gm, unmatched=found.reason)
    cache = settings.cache_config
    try:
        splits = [split_chain(work, info, cache.Fn_compute_blocks, cache.Bn_compute_blocks)
                  for info in pick_chains(work, found, settings)]
        n_branches, branch_by = cfg_branches(work, settings.separate_cfg)
        group = settings.group or sequence_group(work)
        chains = rewrite(work, splits, cache, settings.calibrator_config, n_branches, branch_by, settings.device,
                         group)
    except NoCacheableChain as e:
        return PassResult(gm, unmatched=str(e))
    return PassResult(work, chains, moved_into_branches=sink_into_branches(work))
