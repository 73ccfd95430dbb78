"""The modes an installed transformer goes through, and the state the install's parts share.

Modes, in the order a transformer usually goes through them:

- ``NOT_COMPILED``: nothing compiled yet.
- ``GRAD``: called with grad enabled before any inference call; an uncached compile serves those calls
  (caching is inference-only, and islands have no backward).
- ``ONE_GRAPH``: the first inference call compiled the forward as one graph, making the submodules that
  break it inside every block islands (capture/islands.py) until it fit.
- ``GRAPH_BREAKS``: the forward still breaks outside the blocks (or a later recompile met a break):
  compiled with breaks; the graph holding the blocks is cached. When no graph holds two of the largest
  list's blocks (a break before the block loop that Dynamo cannot resume from), that list goes ``EAGER``.
- ``OVER_SHAPE_LIMIT``: ``graph.MAX_GRAPHS`` input shapes have compiled; calls with further shapes run the
  plain forward (one warning), known shapes keep their graphs.
- ``EAGER``: the blocks' own forward breaks the graph (islands cannot isolate a block from itself), weight
  offload hooks move weights in every block call, or ``enable_cache(..., eager=True)`` asked for it: hooks
  on the block list run the cache (eager.py), one warning naming the cause.
- ``UNCACHED``: nothing can cache this transformer (a warning said why); it runs its own forward.
"""
from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass

import torch

from ..runtime.handle import CacheHandle


class Mode(enum.Enum):
    NOT_COMPILED = "not compiled yet"
    GRAD = "grad-mode path (uncached)"
    ONE_GRAPH = "one graph"
    GRAPH_BREAKS = "graph breaks"
    OVER_SHAPE_LIMIT = "over the shape limit"
    EAGER = "eager cache (block hooks, decisions on the host)"
    UNCACHED = "uncached (a warning said why)"


@dataclass(eq=False)
class InstallState:
    """What the parts of one install share: the handle (which owns the configs), the module, the
    backend options the compiles use, the mode, and the CFG branch of the call in flight (when the
    caller names it through diffusers' ``cache_context``)."""

    handle: CacheHandle
    options: dict
    module_ref: weakref.ref | None = None
    mode: Mode = Mode.NOT_COMPILED
    branch: int | None = None
    dynamic: bool | None = None  # torch.compile's: None compiles a second size once for all sizes

    @property
    def module(self) -> torch.nn.Module:
        return self.module_ref()

    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    def set_hints(self, chains) -> None:
        """Tell the chains' graphs the branch of the call in flight (-1: found on device)."""
        for chain in chains:
            chain.state.tensors["branch_hint"].fill_(-1 if self.branch is None else self.branch)
