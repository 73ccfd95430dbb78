"""The cache state a compiled graph is called with. A graph compiled for static shapes takes its chains'
state tensors as they are. A graph compiled with dynamic sizes (torch.compile's automatic-dynamic
recompile when a second resolution arrives, or ``dynamic=True``) serves every size from one compile,
while the state stays per *concrete* size: each size gets the state set a static compile of that size
would hold (its own counters, reference and ladders), so decisions at a size equal a static compile's.
It is made on the first call of that size, or shared with an earlier graph of the same handle that
already holds that size (the static graph compiled before the recompile), and listed in the handle like
a graph of its own (``summary()``'s rows per shape)."""
from __future__ import annotations

import dataclasses

import torch
from torch._guards import TracingContext

from ..errors import NoCacheableChain
from ..runtime.chain_state import ChainState
from ..runtime.handle import CacheHandle, CachedChain, CompiledGraph
from ..runtime.shapes import evaluate, is_dynamic, symbol_values, symbols_of, template


def is_static(example_inputs) -> bool:
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            return False
        if isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape):
            return False
    return True


@dataclasses.dataclass
class _Sized:
    shape: tuple


def _hint(value):
    """A graph input's example value read at the capture's example sizes (a tensor as a stand-in with its
    ``shape``): reading a symbolic size itself would specialise it."""
    if isinstance(value, torch.SymInt):
        return value.node.hint
    if isinstance(value, torch.Tensor):
        return _Sized(tuple(_hint(d) for d in value.shape))
    return value


class StaticStates:
    """The state of a graph compiled for one size: the same tensors on every call."""

    def __init__(self, chains):
        self.tensors = [t for c in chains for t in c.state.ordered()]
        self.graph: CompiledGraph | None = None  # the compiled graph, once recorded in the handle

    def examples(self, gm) -> list[torch.Tensor]:
        return self.tensors

    def for_call(self, args) -> list[torch.Tensor]:
        """The state tensors of this call; the graph that holds them is marked as run (summary())."""
        self.graph.ran()
        return self.tensors


class SizedStates:
    """The state sets of a graph compiled with dynamic sizes, one per concrete size (see the module's
    docstring). ``chains``: the rewritten chains (their state is the example size's)."""

    def __init__(self, handle: CacheHandle, chains, graph_inputs: list, weights):
        """``graph_inputs``: the example values of the captured graph's inputs (symbolic sizes)."""
        bare = [type(c).__name__ for c in chains if not hasattr(c, "state_shapes")]
        if bare:  # DBPrune's per-block states have no size templates
            raise NoCacheableChain(f"{bare[0]} (DBPrune) compiles for static shapes; compile with dynamic=False")
        self.handle, self.chains, self.weights = handle, chains, weights
        self.symbols = symbols_of(graph_inputs)
        self.shapes = [c.state_shapes() for c in chains]  # symbolic
        self.templates = [{n: template(s) for n, s in shapes.items() if is_dynamic(template(s))}
                          for shapes in self.shapes]
        hints = [_hint(v) for v in graph_inputs]
        self.by_size = {tuple(symbol_values(self.symbols, hints).values()): [t for c in chains
                                                                           for t in c.state.ordered()]}
        self.graph: CompiledGraph | None = None  # the compiled graph (the example size's state), once recorded
        self.graphs_by_size: dict[tuple, list[CompiledGraph]] = {}  # the other sizes' entries in the handle

    def examples(self, gm) -> list[torch.Tensor]:
        """The state as the compiler sees it: fake tensors of the graph's symbolic sizes where a size is
        dynamic (a real tensor would specialise the size to the example's), the state tensors elsewhere;
        set on the graph's state placeholders too."""
        fake_mode = TracingContext.get().fake_mode
        out = []
        for chain, shapes in zip(self.chains, self.shapes):
            for name, tensor in zip(chain.layout.names(), chain.state.ordered()):
                if name in shapes and is_dynamic(template(shapes[name])):
                    with fake_mode:
                        tensor = torch.empty(shapes[name], dtype=tensor.dtype, device=tensor.device)
                out.append(tensor)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][-len(out):]
        for node, value in zip(placeholders, out):
            node.meta["example_value"] = value
        return out

    def for_call(self, args) -> list[torch.Tensor]:
        key = tuple(symbol_values(self.symbols, args).values())
        found = self.by_size.get(key)
        if found is None:
            held = [self._state_at(c, templates, args) for c, templates in zip(self.chains, self.templates)]
            found = self.by_size[key] = [t for state, _ in held for t in state.ordered()]
            self.graphs_by_size[key] = [graph for _, graph in held]
        for graph in self.graphs_by_size.get(key, [self.graph]):  # summary(): which sizes the last request ran
            graph.ran()
        return found

    def _state_at(self, chain, templates: dict, args) -> tuple[ChainState, CompiledGraph]:
        """The state a static compile at this call's sizes would hold, and the graph entry holding it."""
        sizes = {name: evaluate(t, self.symbols, args) for name, t in templates.items()}
        layout = chain.layout
        streams = tuple(dataclasses.replace(st, shape=sizes[f"ladder_{k}"][2:]) if f"ladder_{k}" in sizes else st
                        for k, st in enumerate(layout.streams))
        layout = dataclasses.replace(layout, streams=streams, fn_shape=sizes.get("ref", (0, *layout.fn_shape))[1:],
                                     latent_shape=sizes.get("prev_latent", layout.latent_shape))
        same = next(((c, g) for g in self.handle.install_graphs() for c in g.chains
                     if c.about == chain.about and c.layout == layout), None)
        if same is not None:  # an earlier graph of this install holds this size (the static compile)
            return same[0].state, same[1]
        state = ChainState(layout, self.handle.cache_config, device=chain.state.tensors["params"].device)
        state.tensors["branch_hint"].copy_(chain.state.tensors["branch_hint"])  # this call's, set by the caller
        graph = CompiledGraph([CachedChain(chain.about, layout, state)])
        self.handle.add(graph, self.weights)
        return state, graph
