"""What the backend compiled for one model: its graphs, their chains and state. reset / summary /
stats read it; enable_cache's hook owns one per transformer, a bare ``backend="cachedit"`` compile
makes its own."""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from .config import DBCacheConfig, TaylorSeerCalibratorConfig, coerce, structural_changes, validated
from .errors import ConfigError
from .parallel import chains_group, check_same_config
from .passes.rewrite import RewrittenChain
from .state import ChainAbout, ChainLayout, ChainState


@dataclass(eq=False)
class CachedChain:
    """A chain's description and state when no rewritten graph of ours holds it (a loaded export
    package, the eager path); it reads like a :class:`RewrittenChain` to reset / stats."""

    about: ChainAbout
    layout: ChainLayout
    state: ChainState


def chain_lists(name: str | None) -> list[str]:
    """The block list paths of a chain's name (``transformer_blocks[2]+single_transformer_blocks[2]``)."""
    return [part.rsplit("[", 1)[0] for part in (name or "").split("+") if part]


@dataclass(eq=False)
class CompiledGraph:
    """One compiled graph's chains and the ids of the parameters it was compiled for."""

    chains: list[RewrittenChain | CachedChain]
    param_ptrs: frozenset
    unmatched: str | None = None


@dataclass(eq=False)
class CacheHandle:
    """Everything the backend compiled for one model."""

    cache_config: DBCacheConfig
    calibrator_config: TaylorSeerCalibratorConfig | None
    graphs: list[CompiledGraph] = field(default_factory=list)
    islands_checked: bool = False  # enable_cache looked for islands before compiling (islands.py)
    resets_per_call: bool = False  # a pipeline install: every pipeline call starts a new request
    warned: set = field(default_factory=set)  # causes already warned about, one warning each per install
    held: list | None = None  # warnings waiting for release_warnings(), or None: warn at once

    def __post_init__(self) -> None:
        _ALL_HANDLES.add(self)

    def warn_once(self, cause: str, message: str, stacklevel: int = 3) -> None:
        """Warn about ``cause`` once per install: this handle's and those over the same weights. While
        ``held`` is a list, the warning waits there (the install may find a deeper cause first)."""
        ptrs = frozenset().union(*(g.param_ptrs for g in self.graphs))
        if any(cause in h.warned for h in {self, *handles_sharing(ptrs)}):
            return
        self.warned.add(cause)
        if self.held is not None:
            self.held.append(message)
        else:
            warnings.warn(message, stacklevel=stacklevel + 1)

    def release_warnings(self, drop: bool = False) -> None:
        """Issue (or ``drop``) the held warnings; later ones are issued at once."""
        held, self.held = self.held or [], None
        for message in [] if drop else held:
            warnings.warn(message, stacklevel=3)

    def reset(self) -> None:
        for c in self.chains:
            c.state.reset()

    def configure(self, cache_config: DBCacheConfig | dict) -> None:
        """New thresholds / warmup / masks for the next request, with no recompile.

        Raises:
            ConfigError: the config also changes fields compiled into the graphs (Fn / Bn ...).
        """
        cache_config = validated(coerce(cache_config, DBCacheConfig, "cache_config"))
        changed = structural_changes(self.cache_config, cache_config)
        if changed and self.graphs:
            raise ConfigError(f"configure: {', '.join(changed)} are compiled into the graphs; refresh_context "
                              "compiles an enable_cache install again, a torch.compile or an export needs a new one")
        group = chains_group(self.chains)
        if group is not None:  # one rank skipping while another computes would hang their collectives
            check_same_config(group, cache_config, self.calibrator_config)
        self.cache_config = cache_config
        for c in self.chains:
            c.state.configure(self.cache_config)

    def add(self, graph: CompiledGraph) -> None:
        """A newly compiled graph; its state starts from the handle's current numbers (configure() may
        have run before it compiled: compiles are lazy, and a new shape compiles a new graph later)."""
        for c in graph.chains:
            c.state.configure(self.cache_config)
        self.graphs.append(graph)

    @property
    def chains(self) -> list[RewrittenChain | CachedChain]:
        return [c for g in self.graphs for c in g.chains]


_ALL_HANDLES: "weakref.WeakSet[CacheHandle]" = weakref.WeakSet()


def handles_for(module: torch.nn.Module) -> list[CacheHandle]:
    """Handles whose graphs were compiled over this module's parameters."""
    return handles_sharing({p.data_ptr() for p in module.parameters()})


def handles_sharing(ptrs) -> list[CacheHandle]:
    """Handles with a graph over any of these parameter storages (a bare torch.compile makes a handle
    per graph: together they are one install)."""
    return [h for h in list(_ALL_HANDLES) if any(g.param_ptrs & ptrs for g in h.graphs)]


def weight_ptrs(gm: GraphModule, example_inputs) -> frozenset:
    """Storage of the graph's lifted parameters and buffers: how reset/summary find a module's graphs
    (activations are left out, so a freed input's address can never match a later module)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return frozenset(x.data_ptr() for name, x in zip(names, example_inputs)
                     if isinstance(x, torch.Tensor) and ("_parameters_" in name or "_buffers_" in name))
