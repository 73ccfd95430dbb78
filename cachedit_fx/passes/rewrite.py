"""Replace each chain's middle by an on-device decision and a ``torch.cond``.

    fn_res   = H_after_Fn - H_before_Fn
    pre      = pre_step(fn_res, timestep, latent, *state)   # decide: a PreStep, pre.pred a 0-dim bool
    outs, finite, rows = cond(pre.pred, cached_branch, full_branch, operands)
    post_step(pre, finite, rows, *state)                   # index_copy_ / index_put_ into state, outside the cond

The cached branch forecasts the middle's outputs (:func:`~cachedit_fx.runtime.step.cached_step`) and returns
no rows; the full branch runs the middle and returns the reference and ladder rows a computed step
stores (:func:`~cachedit_fx.runtime.step.computed_step`). The state tensors become extra placeholders at the
end of the graph's inputs: the caller owns them and passes them on every call (AOTAutograd keeps the
in-place writes as input mutations; the same layout survives torch.export / AOTInductor).
"""
from __future__ import annotations

import dataclasses
import hashlib
import operator
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch
from torch.fx import GraphModule, Node

from ..capture.fx_facts import concrete_shape, node_value
from ..config import PassSettings
from ..errors import NoCacheableChain
from ..runtime.chain_state import ChainState
from ..runtime.layout import ChainAbout, ChainLayout, chain_layout
from ..runtime.step import PreStep, cached_step, computed_step, post_step, pre_step
from .blocks import latent_input, timestep_input
from .patterns import ChainInfo
from .split import Split, passthrough_module, segment_module
from .steps import TaggedStep


def inline(graph: torch.fx.Graph, sub: GraphModule, args) -> list[Node]:
    """Copy ``sub``'s nodes into ``graph`` at the current insertion point, fed by ``args``."""
    val_map = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], args))
    out = graph.graph_copy(sub.graph, val_map)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def fresh_dense(x: torch.Tensor) -> torch.Tensor:
    """A dense copy of ``x`` (a cond branch's output): torch.cond merges its branches' output strides only
    where each is a product of sizes, and a contiguous clone's strides are products of ``max(size, 1)``.
    With a symbolic size sympy cannot prove >= 1 (Wan's patchified tokens, ``2*(h//2)*(w//2)``), the
    merge fails; the copy is then viewed with the plain products."""
    copy = x.clone(memory_format=torch.contiguous_format)
    if all(isinstance(size, int) for size in x.shape):
        return copy
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step = step * size
    return copy.as_strided(x.shape, tuple(reversed(strides)))


def cond_branch(n_operands: int, body, segment: GraphModule) -> GraphModule:
    """A flat cond branch returning fresh tensors: branch outputs must not alias operands or each other
    (Flux single blocks return slices). It holds no submodules, so torch.export can trace it, except the
    subgraphs a higher-order op in ``segment`` reads (flex_attention's score_mod), copied from it."""
    graph = torch.fx.Graph()
    operands = [graph.placeholder(f"operand_{i}") for i in range(n_operands)]
    outs = body(graph, operands)
    graph.output(tuple(graph.call_function(fresh_dense, (o,)) for o in outs))
    return GraphModule(segment, graph)  # takes from ``segment`` only what the graph's get_attr nodes name


# The operands after the middle's inputs, in this order, then the stored state (layout.stored_names()),
# then the history counters (layout.history_names()); both branches take the same operands.
_STEP_OPERANDS = ("fn_res", "use_cache", "step", "branch", "ladder_len", "distance")


def _n_outputs(layout: ChainLayout) -> int:
    # BranchOut flattened: outs, finite, rows, logged
    return len(layout.streams) + 1 + len(layout.stored_names()) + int(layout.records_ratios)


def size_symbols(gm: GraphModule) -> list[Node]:
    """The graph's size symbols (the ``SymInt`` placeholders of a capture with dynamic sizes), passed to
    the cond as operands its branches do not read. Inductor compiles a branch as a function of its operands
    and must find every symbol of their sizes among them: Wan's tokens are ``2*(h//2)*(w//2)``, and ``h``
    and ``w`` are no operand's size. (Dynamo lifts them the same way for a cond it traces.)"""
    return [n for n in gm.graph.find_nodes(op="placeholder") if isinstance(node_value(n), torch.SymInt)
            and isinstance(node_value(n).node.expr, sympy.Symbol)]


def taking_sizes(branch: GraphModule, n_sizes: int) -> GraphModule:
    """``branch`` with ``n_sizes`` more operands after its own, unread: the size symbols."""
    if not n_sizes:
        return branch
    last = branch.graph.find_nodes(op="placeholder")[-1]
    for i in reversed(range(n_sizes)):  # each inserted right after the last operand: in order
        with branch.graph.inserting_after(last):
            branch.graph.placeholder(f"size_{i}")
    branch.recompile()
    return branch


def _step_branch(layout: ChainLayout, n_in: int, segment: GraphModule, step_fn, body) -> GraphModule:
    """A branch whose ``body(g, middle_inputs, step_operands, stored)`` returns the args of ``step_fn``
    (a step.py function returning a :class:`BranchOut`) but the history counters, which follow them;
    the branch returns the BranchOut flattened."""
    flat = tagged_step(step_fn, layout, f"cachedit_{step_fn.__name__}", flat=True)
    n_step, n_stored = len(_STEP_OPERANDS), len(layout.stored_names())

    def graph_body(g, ops):
        mid, step_ops = ops[:n_in], dict(zip(_STEP_OPERANDS, ops[n_in:n_in + n_step]))
        stored, history = ops[n_in + n_step:n_in + n_step + n_stored], ops[n_in + n_step + n_stored:]
        out = _call(g, "call_function", flat, (*body(g, mid, step_ops, stored), history))
        return [g.call_function(operator.getitem, (out, i)) for i in range(_n_outputs(layout))]

    return cond_branch(n_in + n_step + n_stored + len(layout.history_names()), graph_body, segment)


def full_branch(layout: ChainLayout, middle: GraphModule, passthrough: GraphModule, n_in: int) -> GraphModule:
    """The middle's blocks run, then what a computed step stores."""

    def body(g, mid, s, stored):
        outs, base = inline(g, middle, mid), inline(g, passthrough, mid)
        return (s["use_cache"], s["step"], s["branch"], s["ladder_len"], s["distance"], s["fn_res"], outs, base,
                stored[0], stored[1:])

    return _step_branch(layout, n_in, middle, computed_step, body)


def cached_branch(layout: ChainLayout, passthrough: GraphModule, n_in: int) -> GraphModule:
    """Blocks skipped: the passthrough (glue only) plus the forecast residuals. It recomputes the
    passthrough from the operands rather than taking it as operands, which would alias them."""

    def body(g, mid, s, stored):
        return (inline(g, passthrough, mid), s["branch"], s["ladder_len"], s["distance"], stored[0], stored[1:])

    return _step_branch(layout, n_in, passthrough, cached_step, body)


@dataclass(eq=False)
class RewrittenChain:
    info: ChainInfo
    split: Split
    layout: ChainLayout
    state: ChainState
    inserted: list[Node]
    latent: Node | None = None  # the latent input the state remembers (to tell requests apart)
    timestep: Node | None = None  # the timestep input (None: nothing in the graph tells requests apart)

    @property
    def about(self) -> ChainAbout:
        return ChainAbout(self.info.name, self.info.pattern, self.info.n_blocks, self.split.fn, self.split.bn)

    def state_shapes(self) -> dict[str, tuple]:
        """The shapes of the activation-sized state (reference, remembered latent, ladders) in the
        graph's own sizes: symbolic where the capture has dynamic dims."""
        nb = self.layout.n_branches
        out = {"ref": (nb, *node_value(self.split.h_fn).shape)}
        if self.latent is not None:
            out["prev_latent"] = tuple(node_value(self.latent).shape)
        for k, (node, spec) in enumerate(zip(self.split.middle_outputs, self.layout.streams)):
            out[f"ladder_{k}"] = (nb, spec.ladder, *node_value(node).shape)
        return out


def make_layout(split: Split, settings: PassSettings, sees_timestep: bool, latent: Node | None = None,
                group: str | None = None) -> ChainLayout:
    h = node_value(split.h_fn)
    h_in = node_value(split.h_in)
    if concrete_shape(h) != concrete_shape(h_in):
        raise NoCacheableChain(f"chain {split.info.name}: H changes shape inside Fn ({tuple(h_in.shape)} -> "
                         f"{tuple(h.shape)}); choose Fn_compute_blocks within the first block list")
    streams = []
    for o in split.middle_outputs:
        v = node_value(o)
        if not isinstance(v, torch.Tensor):
            raise NoCacheableChain(f"chain {split.info.name}: middle output {o.name} is not a tensor")
        streams.append((concrete_shape(v), v.dtype, split.output_roles[o]))
    if settings.cache_config.per_sample and not isinstance(h.shape[0], int):
        raise NoCacheableChain(f"chain {split.info.name}: per_sample=True needs a static batch size (one state slot "
                         "per sample); keep the batch dimension static")
    x = node_value(latent) if latent is not None else None
    return chain_layout((concrete_shape(h), h.dtype), streams, settings.cache_config, settings.calibrator_config,
                        settings.separate_cfg, sees_timestep, (concrete_shape(x), x.dtype) if x is not None else None,
                        group)


@torch.library.custom_op("cachedit::dense_copy", mutates_args=())
def dense_copy(x: torch.Tensor) -> torch.Tensor:
    return x.clone(memory_format=torch.contiguous_format)


@dense_copy.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_CATS = (torch.cat, torch.concat, torch.concatenate)


def own_buffer(node: Node, add) -> Node:
    """A cond operand that a ``cat`` also reads, as a copy in a buffer of its own. Inductor lowers such
    a value straight into a slice of the cat's output and hands the cond that strided view, while the
    branches were compiled for a dense operand (HiDream's double->single glue). A ``clone`` would be
    removed as a no-op; a custom op is opaque to those passes."""
    if isinstance(node.meta.get("example_value"), torch.Tensor) and any(
            u.op == "call_function" and u.target in _CATS for u in node.users):
        copy = add("call_function", torch.ops.cachedit.dense_copy.default, (node,))
        copy.meta["example_value"] = node.meta["example_value"]
        return copy
    return node


def _code_digest() -> str:
    """A digest of the code the step functions run (runtime/step.py and what it calls)."""
    from ..runtime import algorithm, calibrators, layout, step

    sources = b"".join(Path(m.__file__).read_bytes() for m in (algorithm, calibrators, layout, step))
    return hashlib.sha256(sources).hexdigest()


_CODE_DIGEST = _code_digest()


def named_function(fn, name: str):
    """``fn`` named ``name``: an untagged step (the on-disk caches bypass a graph calling it: DBPrune's)."""
    fn.__name__ = fn.__qualname__ = name
    return fn


def tagged_step(step_fn, layout: ChainLayout, name: str, flat: bool = False) -> TaggedStep:
    """``step_fn(layout, ...)`` (a step.py function) as a :class:`~cachedit_fx.passes.steps.TaggedStep`
    named ``name``, with a ``cache_tag``: a digest of what it computes, the layout's structure (not its
    sizes, which reach the graph as its inputs' shapes) and the step code. Inductor's and AOTAutograd's
    on-disk caches key a graph on its code; the nodes calling these functions carry the tag in their names
    (:func:`_call`), so two rewrites that compute differently never share an entry, and a new process
    finds the entry of an equal one."""
    sizeless = dataclasses.replace(layout, fn_shape=(), latent_shape=() if layout.latent_shape else None,
                                   streams=tuple(dataclasses.replace(st, shape=()) for st in layout.streams))
    tag = hashlib.sha256(f"{sizeless!r}{_CODE_DIGEST}".encode()).hexdigest()[:16]
    return TaggedStep(step_fn, layout, name, tag, flat)


def state_placeholders(gm: GraphModule, idx: int, names: list[str], tensors: list[torch.Tensor]) -> list[Node]:
    """Chain ``idx``'s state tensors as placeholders after the graph's own inputs: the caller passes them on
    every call (the backend appends them to the inputs)."""
    graph = gm.graph
    first_compute = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_compute):
        nodes = [graph.placeholder(f"cachedit_state_{idx}_{n}") for n in names]
    for node, tensor in zip(nodes, tensors):
        node.meta["example_value"] = tensor
        node._dynamo_source = None  # caller-owned state, not a user input Dynamo guards on
    return nodes


def _call(graph: torch.fx.Graph, op: str, target, args, kwargs=None) -> Node:
    """A node of ``graph``; one calling a tagged step function (:func:`tagged_step`) is named after its tag and
    carries it as the cache hash AOTAutogradCache asks of a Python call target it cannot inspect."""
    tag = getattr(target, "cache_tag", None)
    node = graph.create_node(op, target, args, kwargs or {}, name=target.__name__ if tag else None)
    if tag is not None:
        node.meta.update(is_wrapped=True, user_cache_hash=tag)
    return node


def rewrite_chain(gm: GraphModule, split: Split, idx: int, settings: PassSettings,
                  group: str | None = None) -> RewrittenChain:
    info = split.info
    if not split.middle_nodes or not split.middle_outputs:
        raise NoCacheableChain(f"chain {info.name}: the middle segment is empty (Fn + Bn == number of blocks)")
    for i in split.middle_inputs:
        if not isinstance(node_value(i), (torch.Tensor, torch.SymInt)):  # sizes of a dynamic-shape capture may pass
            raise NoCacheableChain(f"chain {info.name}: the middle takes a non-tensor value {i.name}")
    timestep, latent = timestep_input(gm), latent_input(gm)
    if timestep is None or latent is not None and concrete_shape(node_value(latent)) is None:
        latent = None  # the latent tells requests apart only beside a timestep, and needs a static shape
    layout = make_layout(split, settings, timestep is not None, latent, group)
    state = ChainState(layout, settings.cache_config, device=settings.device)

    full = segment_module(gm, split.middle_nodes, split.middle_inputs, split.middle_outputs)
    passthrough = passthrough_module(gm, split)
    n_in = len(split.middle_inputs)
    sizes = size_symbols(gm) if settings.size_operands else []
    gm.add_submodule(f"cachedit_full_{idx}", taking_sizes(full_branch(layout, full, passthrough, n_in), len(sizes)))
    gm.add_submodule(f"cachedit_cached_{idx}", taking_sizes(cached_branch(layout, passthrough, n_in), len(sizes)))

    graph = gm.graph
    state_nodes = state_placeholders(gm, idx, layout.names(), state.ordered())
    k = len(split.middle_outputs)
    inserted: list[Node] = []

    after_middle = split.middle_nodes[-1].next  # everything is inserted before it, in order

    def add(op, target, args, kwargs=None):
        with graph.inserting_before(after_middle):
            node = _call(graph, op, target, args, kwargs)
        inserted.append(node)
        return node

    pre_fn = tagged_step(pre_step, layout, f"cachedit_pre_step_{idx}")
    post_fn = tagged_step(post_step, layout, f"cachedit_post_step_{idx}")
    fn_res = add("call_function", operator.sub, (split.h_fn, split.h_in))
    pre = add("call_function", pre_fn, (fn_res, timestep, latent, *state_nodes))

    def field(name):
        return add("call_function", operator.getitem, (pre, PreStep._fields.index(name)))

    by_name = dict(zip(layout.names(), state_nodes))
    step_operands = [fn_res, *(field(n) for n in _STEP_OPERANDS[1:])]
    t_attr = add("get_attr", f"cachedit_cached_{idx}", ())
    f_attr = add("get_attr", f"cachedit_full_{idx}", ())
    operands = (*[own_buffer(i, add) for i in split.middle_inputs], *step_operands,
                *(by_name[n] for n in (*layout.stored_names(), *layout.history_names())), *sizes)
    cond = add("call_function", torch.ops.higher_order.cond, (field("pred"), t_attr, f_attr, operands))
    final = [add("call_function", operator.getitem, (cond, i)) for i in range(_n_outputs(layout))]
    rows_end = k + 1 + len(layout.stored_names())
    add("call_function", post_fn, (pre, final[k], final[k + 1:rows_end], *state_nodes),
        {"logged": final[rows_end:]})
    final = final[:k]
    middle = set(split.middle_nodes)
    for old, new in zip(split.middle_outputs, final):
        if "example_value" in old.meta:  # read by later passes and by AOTAutogradCache (a method's self)
            new.meta["example_value"] = old.meta["example_value"]
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in middle and u not in inserted)
    for node in reversed(split.middle_nodes):
        graph.erase_node(node)
    return RewrittenChain(info, split, layout, state, inserted, latent, timestep)


def rewrite(gm: GraphModule, splits: list[Split], settings: PassSettings,
            group: str | None = None) -> list[RewrittenChain]:
    """Rewrite ``gm`` in place for every split chain; returns what each rewrite added.

    Raises:
        NoCacheableChain: a chain's middle cannot be replaced (the graph is left half-rewritten: callers
            rewrite a copy, see :func:`cachedit_fx.passes.apply`).
    """
    # Last chain first: a rewrite erases and adds nodes only from its own middle on, so the node
    # references of the chains before it stay valid (one chain's output may be the next one's input).
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    chains: list[RewrittenChain | None] = [None] * len(splits)
    for i in sorted(range(len(splits)), key=lambda i: -order[splits[i].h_in]):
        chains[i] = rewrite_chain(gm, splits[i], i, settings, group)
    gm.graph.lint()
    gm.recompile()
    return chains
