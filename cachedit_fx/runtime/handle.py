"""What the backend compiled for one model: its graphs, their chains and state. reset / summary /
stats read it; enable_cache's hook owns one per transformer (and finds it through the module's hook
registry), a bare ``backend="cachedit"`` compile makes its own, found through the module's weights:
:func:`handles_for` looks a module's parameter and buffer *objects* up (by identity, held weakly), so
tensor-subclass weights (which report ``data_ptr() == 0``) and a new model reusing a freed model's
storage never match another install."""
from __future__ import annotations

import itertools
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from ..config import CalibratorConfig, DBCacheConfig, coerce_cache, structural_changes, validated
from ..errors import ConfigError
from .chain_state import ChainState
from .layout import ChainAbout, ChainLayout
from .ranks import chains_group, check_same_config


@dataclass(eq=False)
class CachedChain:
    """A chain's description and state when no rewritten graph of ours holds it (a loaded export
    package, the eager path); it reads like the passes' ``RewrittenChain`` to reset / stats (``about``,
    ``layout``, ``state``)."""

    about: ChainAbout
    layout: ChainLayout
    state: ChainState


def chain_lists(name: str | None) -> list[str]:
    """The block list paths of a chain's name (``transformer_blocks[2]+single_transformer_blocks[2]``)."""
    return [part.rsplit("[", 1)[0] for part in (name or "").split("+") if part]


@dataclass(eq=False)
class CompiledGraph:
    """One compiled graph's chains (the passes' ``RewrittenChain`` or :class:`CachedChain`, anything with
    ``about`` / ``layout`` / ``state``), or the reason it runs uncached."""

    chains: list
    unmatched: str | None = None
    last_run: int = 0  # the host's call count at this graph's latest call (0: never called by the backend)

    def ran(self) -> None:
        """This graph was called: one host-side count, which tells the graphs the last request ran."""
        self.last_run = next(_CALLS)


_CALLS = itertools.count(1)  # calls of every compiled graph, counted on the host


def last_request(handles: list[CacheHandle]) -> list[CompiledGraph]:
    """The graphs of ``handles`` (one module's: a new input shape compiles a graph, and a recompile a
    handle, of its own) that served the last request: the last called one and those called since its
    request began (its state's calls this request, e.g. a CFG pair's other graph of another text length),
    not those of shapes an earlier request used. Every graph where none was called by the backend
    (an export package, the eager cache)."""
    graphs = [g for h in handles for g in h.graphs]
    latest = max(graphs, key=lambda g: g.last_run, default=None)
    if latest is None or latest.last_run == 0:
        return graphs
    calls = max((int(c.state.tensors["calls"].sum()) for c in latest.chains), default=1)
    # a graph not called by the backend (the eager cache beside it) counts as current
    return [g for g in graphs if g.last_run == 0 or g.last_run > latest.last_run - max(calls, 1)]


@dataclass(eq=False)
class CacheHandle:
    """Everything the backend compiled for one model."""

    cache_config: DBCacheConfig
    calibrator_config: CalibratorConfig | None
    graphs: list[CompiledGraph] = field(default_factory=list)
    islands_checked: bool = False  # enable_cache looked for islands before compiling (islands.py)
    resets_per_call: bool = False  # a pipeline install: every pipeline call starts a new request
    requests: int = 0  # requests marked on the host (reset calls): the install's once-per-request checks
    warned: set = field(default_factory=set)  # causes already warned about, one warning each per install
    held: list | None = None  # warnings waiting for release_warnings(), or None: warn at once
    background: list = field(default_factory=list)  # the graphs compiling in a child (backend/background.py)
    serial: int = field(default_factory=itertools.count().__next__, init=False)  # creation order

    def warn_once(self, cause: str, message: str, stacklevel: int = 3) -> None:
        """Warn about ``cause`` once per install: this handle's and those over the same weights. While
        ``held`` is a list, the warning waits there (the install may find a deeper cause first)."""
        if any(cause in h.warned for h in {self, *_WEIGHTS.sharing(self)}):
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
        self.requests += 1
        for c in self.chains:
            c.state.reset()

    def configure(self, cache_config: DBCacheConfig | dict) -> None:
        """New thresholds / warmup / masks for the next request, with no recompile.

        Raises:
            ConfigError: the config also changes fields compiled into the graphs (Fn / Bn ...).
        """
        cache_config = validated(coerce_cache(cache_config))
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

    def add(self, graph: CompiledGraph, weights=()) -> None:
        """A newly compiled graph over ``weights`` (the parameter and buffer objects it reads, which find
        this handle from the module); its state starts from the handle's current numbers (configure() may
        have run before it compiled: compiles are lazy, and a new shape compiles a new graph later)."""
        for c in graph.chains:
            c.state.configure(self.cache_config)
        self.graphs.append(graph)
        _WEIGHTS.record(self, weights)

    @property
    def chains(self) -> list[RewrittenChain | CachedChain]:
        return [c for g in self.graphs for c in g.chains]

    def install_graphs(self) -> list[CompiledGraph]:
        """The graphs of this handle and of the handles over the same weights with the same configs: a
        bare torch.compile makes a handle per graph (a recompile for new sizes included), which together
        are one install."""
        same = [h for h in _WEIGHTS.sharing(self) if (h.cache_config, h.calibrator_config) ==
                (self.cache_config, self.calibrator_config)]
        return [g for h in [self, *same] for g in h.graphs]

    def install_chains(self) -> list:
        """The chains of :meth:`install_graphs`."""
        return [c for g in self.install_graphs() for c in g.chains]


class _WeightIndex:
    """Which handles compiled graphs over which weight tensors: by the tensor object's identity, held
    weakly (an entry dies with its tensor, so a later tensor at the same address or id never matches)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, weakref.WeakSet]] = {}

    def _entry(self, tensor):
        entry = self._entries.get(id(tensor))
        return entry if entry is not None and entry[0]() is tensor else None

    def record(self, handle: CacheHandle, tensors) -> None:
        for t in tensors:
            entry = self._entry(t)
            if entry is None:
                key = id(t)
                ref = weakref.ref(t, lambda r, key=key: self._drop(key, r))
                entry = self._entries[key] = (ref, weakref.WeakSet())
            entry[1].add(handle)

    def _drop(self, key: int, ref: weakref.ref) -> None:
        if key in self._entries and self._entries[key][0] is ref:
            del self._entries[key]

    def handles(self, tensors) -> list[CacheHandle]:
        found: dict[int, CacheHandle] = {}
        for t in tensors:
            entry = self._entry(t)
            for h in list(entry[1]) if entry is not None else []:
                found.setdefault(id(h), h)
        return sorted(found.values(), key=lambda h: h.serial)

    def sharing(self, handle: CacheHandle) -> list[CacheHandle]:
        """Handles over any weight ``handle``'s graphs read (a bare torch.compile makes a handle per
        graph: together they are one install)."""
        mine = [ref() for ref, handles in list(self._entries.values()) if handle in handles]
        return [h for h in self.handles(t for t in mine if t is not None) if h is not handle]


_WEIGHTS = _WeightIndex()


def handles_for(module: torch.nn.Module) -> list[CacheHandle]:
    """Handles whose graphs were compiled over this module's parameters or buffers, oldest first."""
    return _WEIGHTS.handles([*module.parameters(), *module.buffers()])


def graph_weights(gm: GraphModule, example_inputs) -> list[torch.Tensor]:
    """The graph's lifted parameters and buffers among its example inputs (activations are left out: a
    handle is found through the module's weights only)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return [x for name, x in zip(names, example_inputs)
            if isinstance(x, torch.Tensor) and ("_parameters_" in name or "_buffers_" in name)]
