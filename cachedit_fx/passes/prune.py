"""DBPrune's rewrite: every prunable block of a chain behind a ``torch.cond`` of its own.

    call = begin(timestep, latent, *state)                   # before the first prunable block
    for each prunable block k (input x_h, the values it hands on: outs, what they continue: bases):
        pred = block_pre(k, x_h, call, *state)               # decide, record (counters, logs)
        outs, rows = cond(pred, pruned_k, computed_k, operands)
        block_post(call, rows, *block_k_state)               # index_copy_ outside the cond

``pruned_k`` returns each base plus the block's stored residual; ``computed_k`` runs the block's own
nodes and returns the rows a computed block stores (its H input, the next step's reference, and the
residuals). A block's decision reads its own input, which depends on the blocks pruned before it in
the same call, so the decisions cannot be taken up front (docs/architecture.md, "DBPrune"): one cond
per prunable block, each read on the host once per call by a backend that runs conds on the host.
The alternative form ``"masked"`` runs every block and selects (benchmarks/prune_forms.py measures it).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..capture.fx_facts import concrete_shape, node_shape, node_value
from ..config import PassSettings
from ..errors import NoCacheableChain
from ..runtime.chain_state import ChainState
from ..runtime.layout import ChainAbout
from ..runtime.prune import begin, block_post, block_pre, computed_block, masked_block, pruned_block
from ..runtime.prune_layout import PrunedBlock, PruneLayout, prune_layout
from .blocks import latent_input, timestep_input
from .patterns import BlockStreams, ChainInfo
from .rewrite import cond_branch, inline, named_function, own_buffer, state_placeholders
from .split import segment_module

FORMS = ("cond", "masked")


@dataclass(eq=False)
class PrunedChain:
    """A chain rewritten for DBPrune: what the handle, reset and the statistics read."""

    info: ChainInfo
    layout: PruneLayout
    state: ChainState
    inserted: list[Node]
    fn: int
    bn: int
    latent: Node | None = None
    timestep: Node | None = None

    @property
    def about(self) -> ChainAbout:
        return ChainAbout(self.info.name, self.info.pattern, self.info.n_blocks, self.fn, self.bn)


@dataclass(eq=False)
class _Block:
    """One prunable block's facts, read before any block is rewritten."""

    nodes: list[Node]
    h_in: Node
    outputs: list[Node]  # the block's values used after it
    bases: list[Node]  # the input each output continues (what it is when the block is skipped)


def _plan(bs: BlockStreams) -> _Block:
    block = bs.block
    inside = set(block.nodes)
    outputs = [n for n in block.nodes if any(u not in inside for u in n.users)]
    h_in = next((i for i, role in bs.inputs.items() if role == "H"), None)
    if h_in is None or node_shape(h_in) is None:
        raise NoCacheableChain(f"{block.name}: no hidden_states input with a known shape to compare steps by")
    bases = []
    for out in outputs:
        base = bs.continues.get(out)
        if base is None:
            raise NoCacheableChain(f"{block.name}: its output {out.name} continues none of its inputs (a block that "
                                   "creates a stream, pattern 4/5, or hands on another value); DBPrune cannot skip "
                                   f"it: add {block.index} to non_prune_block_ids")
        if node_shape(out) is None or node_shape(out) != node_shape(base):
            raise NoCacheableChain(f"{block.name}: its output {out.name} and the input it continues differ in shape")
        bases.append(base)
    return _Block(block.nodes, h_in, outputs, bases)


def _spec(index: int, plan: _Block) -> PrunedBlock:
    h = node_value(plan.h_in)
    return PrunedBlock(index, concrete_shape(h), h.dtype,
                       tuple((node_shape(o), node_value(o).dtype) for o in plan.outputs))


def _branches(layout: PruneLayout, k: int, plan: _Block, segment: GraphModule, inputs: list[Node]):
    """(pruned, computed) cond branches of prunable block ``k``; operands: the block's inputs, ``call``,
    then the block's stored state."""
    n_in, n_stored, n_out = len(inputs), len(layout.stored_names(k)), len(plan.outputs)
    where = {node: i for i, node in enumerate(inputs)}
    skip = named_function(lambda bases, call, stored: pruned_block(layout, bases, call[:1], stored),
                          f"cachedit_pruned_block_{k}")

    def pruned(g, ops):
        out = g.call_function(skip, ([ops[where[b]] for b in plan.bases], ops[n_in], ops[n_in + 1:]))
        return [g.call_function(operator.getitem, (out, i)) for i in range(n_out + n_stored)]

    def computed(g, ops):
        outs = inline(g, segment, ops[:n_in])
        out = g.call_function(computed_block, (ops[where[plan.h_in]], outs, [ops[where[b]] for b in plan.bases]))
        return [g.call_function(operator.getitem, (out, i)) for i in range(n_out + n_stored)]

    n_ops = n_in + 1 + n_stored
    return cond_branch(n_ops, pruned, segment), cond_branch(n_ops, computed, segment)


def _rewrite_block(gm: GraphModule, layout: PruneLayout, k: int, plan: _Block, call: Node, by_name: dict,
                   idx: int, form: str) -> list[Node]:
    graph = gm.graph
    inside = set(plan.nodes)
    stored = [by_name[n] for n in layout.stored_names(k)]
    inputs = list(dict.fromkeys(a for n in plan.nodes for a in n.all_input_nodes
                                if a not in inside and a.op != "get_attr"))
    for i in inputs:
        if not isinstance(node_value(i), (torch.Tensor, torch.SymInt)):
            raise NoCacheableChain(f"block {plan.nodes[0].name}: it takes a non-tensor value {i.name}")
    inserted: list[Node] = []
    after = plan.nodes[-1].next

    def add(op, target, args):
        with graph.inserting_before(after):
            node = graph.create_node(op, target, args, {})
        inserted.append(node)
        return node

    pre_fn = named_function(lambda x, c, *st: block_pre(layout, k, x, c, *st), f"cachedit_prune_pre_{idx}_{k}")
    pred = add("call_function", pre_fn, (plan.h_in, call, *by_name.values()))
    n_out = len(plan.outputs)
    if form == "cond":
        segment = segment_module(gm, plan.nodes, inputs, plan.outputs)
        skip, run = _branches(layout, k, plan, segment, inputs)
        gm.add_submodule(f"cachedit_pruned_{idx}_{k}", skip)
        gm.add_submodule(f"cachedit_computed_{idx}_{k}", run)
        operands = (*[own_buffer(i, add) for i in inputs], call, *stored)
        t_attr = add("get_attr", f"cachedit_pruned_{idx}_{k}", ())
        f_attr = add("get_attr", f"cachedit_computed_{idx}_{k}", ())
        result = add("call_function", torch.ops.higher_order.cond, (pred, t_attr, f_attr, operands))
    else:
        select = named_function(lambda p, x, o, b, c, s: masked_block(layout, p, x, o, b, c[:1], s),
                                f"cachedit_masked_block_{idx}_{k}")
        result = add("call_function", select, (pred, plan.h_in, list(plan.outputs), list(plan.bases), call, stored))
    items = [add("call_function", operator.getitem, (result, i)) for i in range(n_out + len(stored))]
    add("call_function", named_function(block_post, f"cachedit_prune_post_{idx}_{k}"), (call, items[n_out:], *stored))
    mine = set(inserted)
    for old, new in zip(plan.outputs, items[:n_out]):
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in inside and u not in mine)
    if form == "cond":
        for node in reversed(plan.nodes):
            graph.erase_node(node)
    return inserted


def rewrite_pruned_chain(gm: GraphModule, info: ChainInfo, idx: int, settings: PassSettings,
                         form: str = "cond") -> PrunedChain:
    """Rewrite chain ``info`` of ``gm`` in place for DBPrune.

    Raises:
        NoCacheableChain: no block is prunable, or a prunable block hands on a value it does not continue
            from its inputs (the graph is left half-rewritten: callers rewrite a copy).
    """
    cache = settings.cache_config
    prunable = cache.prunable(info.n_blocks)
    if not prunable:
        raise NoCacheableChain(f"chain {info.name}: no block to prune (Fn_compute_blocks={cache.Fn_compute_blocks}, "
                               f"Bn_compute_blocks={cache.Bn_compute_blocks}, non_prune_block_ids="
                               f"{cache.non_prune_block_ids} cover its {info.n_blocks} blocks)")
    plans = [_plan(info.streams[j]) for j in prunable]
    timestep, latent = timestep_input(gm), latent_input(gm)
    if timestep is None or latent is not None and concrete_shape(node_value(latent)) is None:
        latent = None  # as in rewrite.py: the latent tells requests apart only beside a timestep
    x = node_value(latent) if latent is not None else None
    layout = prune_layout([_spec(j, p) for j, p in zip(prunable, plans)], info.n_blocks, cache, settings.separate_cfg,
                          timestep is not None, (concrete_shape(x), x.dtype) if x is not None else None)
    state = ChainState(layout, cache, device=settings.device)
    state_nodes = state_placeholders(gm, idx, layout.names(), state.ordered())
    by_name = dict(zip(layout.names(), state_nodes))
    begin_fn = named_function(lambda t, x_, *st: begin(layout, t, x_, *st), f"cachedit_prune_begin_{idx}")
    with gm.graph.inserting_before(plans[0].nodes[0]):
        call = gm.graph.create_node("call_function", begin_fn, (timestep, latent, *state_nodes), {})
    inserted = [call]
    for k in reversed(range(len(plans))):  # last first: a block's facts name the nodes of the blocks before it
        inserted += _rewrite_block(gm, layout, k, plans[k], call, by_name, idx, form)
    return PrunedChain(info, layout, state, inserted, cache.Fn_compute_blocks, cache.Bn_compute_blocks, latent,
                       timestep)


def rewrite_pruned(gm: GraphModule, infos: list[ChainInfo], settings: PassSettings) -> list[PrunedChain]:
    """Rewrite ``gm`` in place for DBPrune on every chain of ``infos`` (the last chain first, so the node
    references of the chains before it stay valid); ``settings.prune_form`` picks the form."""
    if settings.prune_form not in FORMS:
        raise ValueError(f"prune_form must be one of {FORMS}, got {settings.prune_form!r}")
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    chains: list[PrunedChain | None] = [None] * len(infos)
    for i in sorted(range(len(infos)), key=lambda i: -order[infos[i].blocks[0].nodes[0]]):
        chains[i] = rewrite_pruned_chain(gm, infos[i], i, settings, settings.prune_form)
    gm.graph.lint()
    gm.recompile()
    return chains
