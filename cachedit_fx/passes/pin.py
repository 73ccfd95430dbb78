"""Chains pinned by hand (a ``BlockAdapter``): pick the chain the user named, checked against the graph.

The graph's analysis stays the judge: the named block lists must be consecutive lists of one chain
found in the graph (a part of a longer chain is cut out and classified again), and a named forward
pattern must return the streams the graph's blocks return. A pin that contradicts the graph is a
``ConfigError`` saying what the graph shows.
"""
from __future__ import annotations

from torch.fx import GraphModule

from ..config import PinnedList
from ..errors import ConfigError
from .blocks import Chain
from .patterns import ChainInfo, classify_chain


def _describe(found: list[ChainInfo]) -> str:
    return "; ".join(f"{c.name} (pattern {c.pattern})" for c in found) or "none"


def _sub_chain(gm: GraphModule, info: ChainInfo, paths: list[str]) -> ChainInfo | None:
    """The part of ``info`` made of exactly the lists ``paths`` (consecutive, in order), or None."""
    lists = [path for path, _, _ in info.list_patterns]
    for start in range(len(lists) - len(paths) + 1):
        if lists[start:start + len(paths)] == paths:
            if len(paths) == len(lists):
                return info
            first = sum(n for _, n, _ in info.list_patterns[:start])
            count = sum(n for _, n, _ in info.list_patterns[start:start + len(paths)])
            chain = info.chain
            return classify_chain(gm, Chain(chain.blocks[first:first + count], chain.glue[first:first + count - 1]))
    return None


def pin_chain(gm: GraphModule, found: list[ChainInfo], pinned: tuple[PinnedList, ...]) -> ChainInfo:
    """The chain of ``found`` the pin names, checked.

    Raises:
        ConfigError: the named lists are not one chain in the graph, or a named pattern returns other
            streams than the graph's blocks do.
    """
    paths = [p.path for p in pinned]
    chain = next((c for c in (_sub_chain(gm, info, paths) for info in found) if c is not None), None)
    if chain is None:
        raise ConfigError(f"BlockAdapter: blocks {paths} are not one chain of blocks feeding each other in the "
                          f"graph; the graph's chains: {_describe(found)}")
    shown = {path: pattern for path, _, pattern in chain.list_patterns}
    for p in pinned:
        if p.pattern is not None and p.pattern.Out != shown[p.path].Out:
            raise ConfigError(f"BlockAdapter: forward_pattern {p.pattern.name} for {p.path} returns {p.pattern.Out}, "
                              f"but its blocks return {shown[p.path].Out} in the graph ({shown[p.path].name})")
    return chain
