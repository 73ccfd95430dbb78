"""The cachedit pass pipeline, one entry for every caller (the backend, export, the graph report):

    find chains (blocks.py) -> classify (patterns.py) -> pick -> split (split.py) -> rewrite (rewrite.py)
    -> sink (sink.py) -> flatten tensor-subclass cond operands (subclass.py);
    DBPrune: ... -> pick -> a cond per prunable block (prune.py) -> sink -> flatten

The analyses return data; the rewrite and the sink are the transforms, applied to a copy of the graph,
so a graph the passes cannot handle comes back untouched with the reason (``PassResult.unmatched``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from ..capture.fx_facts import clone_graph_module
from ..config import ChainPolicy, PassSettings, is_prune
from ..errors import NoCacheableChain
from . import regions
from .parallel import sequence_group
from .patterns import ChainInfo, Unmatched, analyze
from .pin import pin_chain
from .prune import PrunedChain, rewrite_pruned
from .rewrite import RewrittenChain, rewrite
from .sink import sink_into_branches
from .split import split_chain
from .subclass import flatten_subclass_operands

__all__ = ["PassResult", "PrunedChain", "RewrittenChain", "apply"]


@dataclass
class PassResult:
    """The graph after the passes: the rewritten copy and its chains, or the input graph and why
    nothing was rewritten."""

    graph_module: GraphModule
    chains: list[RewrittenChain | PrunedChain] = field(default_factory=list)
    unmatched: str | None = None
    # nodes of the graph moved into a cond branch, the only one that needs them (sink.py)
    moved_into_branches: list[str] = field(default_factory=list)
    # the class of each tensor-subclass operand (quantized weights) passed to a cond as its plain tensors
    flattened_subclasses: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return self.unmatched is None


def pick_chains(gm: GraphModule, found: list[ChainInfo], settings: PassSettings) -> list[ChainInfo]:
    if settings.pinned:
        return [pin_chain(gm, found, settings.pinned)]
    return found[:1] if settings.chains is ChainPolicy.LONGEST else found


def apply(gm: GraphModule, settings: PassSettings) -> PassResult:
    """Run the pipeline on a copy of ``gm``.

    Args:
        gm: a Dynamo graph of a transformer's forward (left unchanged).
        settings: the structure to compile in (:func:`cachedit_fx.config.pass_settings` makes them).

    Returns:
        A :class:`PassResult`.

    Raises:
        ConfigError: ``Fn_compute_blocks`` / ``Bn_compute_blocks`` do not fit the chain, or a pinned chain
            contradicts the graph.
    """
    work = clone_graph_module(gm)
    cache = settings.cache_config
    found = analyze(work)
    try:
        outside = None if is_prune(cache) else (cache.Fn_compute_blocks, cache.Bn_compute_blocks)
        if not isinstance(found, Unmatched) and _inline_regions(work, pick_chains(work, found, settings), outside):
            found = analyze(work)
        if isinstance(found, Unmatched):
            return PassResult(gm, unmatched=found.reason)
        picked = pick_chains(work, found, settings)
        group = settings.group or sequence_group(work)
        if is_prune(cache):
            if group is not None:  # cache-dit 1.5.3 raises for DBPrune with context parallelism too
                raise NoCacheableChain(f"DBPrune runs in one process; this graph is sharded over {group}")
            chains = rewrite_pruned(work, picked, settings)
        else:
            splits = [split_chain(work, info, cache.Fn_compute_blocks, cache.Bn_compute_blocks, cache.MIN_FN)
                      for info in picked]
            chains = rewrite(work, splits, settings, group)
        moved = sink_into_branches(work)
        flattened = flatten_subclass_operands(work)  # after sink, which moves weight reads into branches
    except NoCacheableChain as e:
        return PassResult(gm, unmatched=str(e))
    return PassResult(work, chains, moved_into_branches=moved, flattened_subclasses=flattened)


def _inline_regions(gm: GraphModule, picked: list[ChainInfo], outside: tuple[int, int] | None) -> int:
    """The region calls among each chain's first Fn and last Bn blocks (``outside``; None: every block),
    inlined. DBCache inlines Fn: the rewrite takes the Fn residual from their nodes, and sink.py moves the
    part of them only the middle reads (Flux's text-stream tail) into the full branch, as on a graph
    without regions. It inlines Bn as well: torch 2.13's Inductor cannot lower a region body called both
    inside a cond branch and outside it (the body is named inside the branch: "'Module' object has no
    attribute 'false_graph_0.repeated_subgraph0'"). DBPrune inlines every block: each prunable block is a
    cond of its own."""
    def kept_outside(blocks):
        if outside is None:
            return blocks
        fn, bn = outside
        return blocks[:fn] + (blocks[len(blocks) - bn:] if bn else [])

    calls = [n for info in picked for b in kept_outside(list(info.blocks)) for n in b.nodes if regions.is_call(n)]
    return regions.inline_calls(gm, calls)
