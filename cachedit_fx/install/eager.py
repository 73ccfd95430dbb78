"""The eager cache: DBCache on a chain of blocks through hooks on them, decided on the host.

For models whose blocks cannot be captured at all: a host sync in a block's *own* forward (``if
x.abs().max().item() > ...``) breaks Dynamo's graph inside every block, and islands cannot isolate a
block from itself. The blocks then run as they are, wrapped: Fn runs, its residual goes through the
same :func:`~cachedit_fx.runtime.step.pre_step` the graph runs, the middle blocks are skipped (identity on
their streams) or run, and :func:`~cachedit_fx.runtime.step.post_step` updates the state. On a model both paths
can run, the decisions are the graph path's.

The chain is one or more ``ModuleList``s in call order whose blocks feed each other directly (no glue
between them), as the graph path joins Flux's ``transformer_blocks`` and ``single_transformer_blocks``;
a block's first argument is H, its ``encoder_hidden_states`` argument E, and the order of what it
returns comes from its forward pattern (a BlockAdapter's, the block's ``return`` statement, or the
output shapes). The first call checks that each later list's first block receives the very tensors the
list before returned; where the model's code changes them between the lists (a ``cat`` of E and H, a
stream dropped), the chain ends at the list before, as one list's chain did before the lists joined.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from ..compat.forward_pattern import ForwardPattern
from ..config import SeparateCFG
from ..errors import ConfigError, NoCacheableChain
from ..passes.patterns import return_order
from ..runtime import ranks
from ..runtime.chain_state import ChainState
from ..runtime.handle import CacheHandle, CachedChain, CompiledGraph
from ..runtime.layout import ChainAbout, chain_layout
from ..runtime.step import cached_step, computed_step, post_step, pre_step

_E = "encoder_hidden_states"


@dataclass
class _Call:
    """What one transformer call has learned so far, block by block."""

    timestep: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    h_in: torch.Tensor | None = None
    fn_res: torch.Tensor | None = None
    base: list | None = None  # the streams entering the middle: what skipping its blocks leaves
    pre: object = None
    chain: CachedChain | None = None
    active: bool = False  # a call of the cached transformer in flight (not grad mode, not a bare block call)
    returned: dict | None = None  # while the lists' joins are checked: each block's (streams, order) by index

    @property
    def cached(self) -> bool:
        return self.pre is not None and bool(self.pre.pred)


@dataclass
class BlockList:
    """One ``ModuleList`` of the chain: its path, blocks and how its blocks take and return H and E."""

    path: str
    blocks: torch.nn.ModuleList
    pattern: ForwardPattern | None = None

    def __post_init__(self):
        cls = type(self.blocks[0])
        self.signature = inspect.signature(cls.forward)
        self.h_name = list(self.signature.parameters)[1]
        self.order = list(self.pattern.Out) if self.pattern is not None else None
        self.source_order = return_order(cls)


class EagerCache:
    """Hooks on the blocks of one or more block lists that cache their middle blocks; states per input
    shape, in ``handle``."""

    def __init__(self, lists: list[BlockList], handle: CacheHandle, separate_cfg: SeparateCFG,
                 group: str | None = None):
        self.lists, self.handle, self.separate_cfg, self.group = list(lists), handle, separate_cfg, group
        self.path = lists[0].path
        self.index = [(k, i) for k, lst in enumerate(lists) for i in range(len(lst.blocks))]
        self._set_span(len(lists))
        self.call = _Call()
        self.checked = len(lists) == 1  # the joins between lists are checked on the first call
        self.broken: str | None = None  # why the chain left after the check cannot cache
        self._chains: dict[tuple, CachedChain] = {}
        for g, (k, i) in enumerate(self.index):
            block = lists[k].blocks[i]
            block.forward = self._wrap(g, block)

    def _set_span(self, n_lists: int) -> None:
        """The chain over the first ``n_lists`` lists: its Fn, middle and Bn block indices."""
        cache = self.handle.cache_config
        n, fn, bn = sum(len(lst.blocks) for lst in self.lists[:n_lists]), cache.Fn_compute_blocks, \
            cache.Bn_compute_blocks
        name = "+".join(f"{lst.path}[{len(lst.blocks)}]" for lst in self.lists[:n_lists])
        if fn + bn > n:
            raise ConfigError(f"Fn_compute_blocks={fn}, Bn_compute_blocks={bn} do not fit chain {name} of {n} "
                              f"blocks: need {cache.MIN_FN} <= Fn, 0 <= Bn and Fn + Bn <= {n}")
        if fn + bn == n:
            raise NoCacheableChain(f"chain {name}: the middle segment is empty (Fn + Bn == number of blocks)")
        self.n, self.name = n, name
        self.last_fn, self.first_mid, self.last_mid = fn - 1, fn, n - bn - 1

    def uninstall(self) -> None:
        for lst in self.lists:
            for block in lst.blocks:
                block.__dict__.pop("forward", None)
        self._chains.clear()

    def begin(self, timestep: torch.Tensor | None, latent: torch.Tensor | None) -> None:
        self.call = _Call(timestep=timestep, latent=latent, active=True, returned=None if self.checked else {})

    def end(self) -> None:
        if self.call.returned is not None and self.call.active:
            self.checked = True  # the whole chain ran, each list fed by the one before
        self.call = _Call()

    # ------------------------------------------------------------------ streams

    def _streams_in(self, lst: BlockList, args, kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        bound = lst.signature.bind(None, *args, **kwargs).arguments
        return bound[lst.h_name], bound.get(_E)

    def _unpack(self, lst: BlockList, out, h_in) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """(H, E or None, the output's order as "H"/"E") of a block's return value."""
        if isinstance(out, torch.Tensor):
            return out, None, ["H"]
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise NoCacheableChain(f"{lst.path}: a block returns {type(out).__name__}, not a tensor or a pair")
        order = self._output_order(lst, out, h_in)
        h, e = (out[0], out[1]) if order == ["H", "E"] else (out[1], out[0])
        return h, e, order

    @staticmethod
    def _output_order(lst: BlockList, out, h_in) -> list[str]:
        if lst.order is not None:
            return ["H" if name == "hidden_states" else "E" for name in lst.order]
        if lst.source_order is not None:
            return lst.source_order
        fits = [isinstance(o, torch.Tensor) and o.shape == h_in.shape for o in out]
        if fits.count(True) != 1:
            raise ConfigError(f"{lst.path}: cannot tell which output of its blocks is hidden_states; pin it with "
                              "BlockAdapter(forward_pattern=...)")
        return ["H", "E"] if fits[0] else ["E", "H"]

    @staticmethod
    def _pack(h, e, order):
        if order == ["H"]:
            return h
        return (h, e) if order == ["H", "E"] else (e, h)

    # ------------------------------------------------------------------ the joins between lists

    def _fed_by_previous(self, call: _Call, g: int, h, e) -> bool:
        """Whether block ``g`` (a list's first) receives exactly the tensors block ``g - 1`` returned."""
        before = call.returned.get(g - 1)
        if before is None:
            return False
        streams, _ = before
        return h is streams[0] and (e is None if len(streams) == 1 else e is streams[1])

    def _end_before(self, call: _Call, k: int) -> None:
        """A call found list ``k`` not fed directly by the list before (glue between the loops, or a list
        that runs elsewhere, as a text projection before the blocks): the chain ends at the list before.
        Where this call's middle has ended already, its state update runs now and the rest of the call
        runs plain; otherwise the call goes on over the shorter chain."""
        for lst in self.lists[k:]:
            for block in lst.blocks:
                block.__dict__.pop("forward", None)
        try:
            self._set_span(k)
        except NoCacheableChain as e:
            self.broken = f"{e} ({self.lists[k].path} is not fed directly by {self.lists[k - 1].path})"
            call.active = False
        self.lists = self.lists[:k]
        self.checked = len(self.lists) == 1
        if self.broken is None and call.chain is not None:
            call.chain.about = dataclasses.replace(call.chain.about, name=self.name, n_blocks=self.n)
            if self.last_mid in call.returned:
                streams, order = call.returned[self.last_mid]
                self._finish(call, streams, order)
                call.active = False

    # ------------------------------------------------------------------ the hooks

    def _wrap(self, g: int, block: torch.nn.Module):
        original = block.forward
        k, i = self.index[g]

        def forward(*args, **kwargs):
            call = self.call
            if not call.active:
                return original(*args, **kwargs)
            lst = self.lists[k]
            h, e = self._streams_in(lst, args, kwargs)
            if g == 0:
                call.h_in = h
                if self.last_fn < 0:  # no Fn (MagCache): decide before the first block
                    self._decide(call, h, [h] + ([e] if e is not None and self._returns_e(lst) else []))
            if call.returned is not None and i == 0 and k > 0 and not self._fed_by_previous(call, g, h, e):
                self._end_before(call, k)
                return original(*args, **kwargs)
            if self.first_mid <= g <= self.last_mid and call.cached:
                order = ["H"] if call.base and len(call.base) == 1 else self._output_order(lst, (h, e), h)
                if g < self.last_mid:
                    return self._pack(h, e, order)  # skipped: its streams pass through to the next block
                return self._finish(call, call.base, order)
            out = original(*args, **kwargs)
            if g in (self.last_fn, self.last_mid) or call.returned is not None:
                h_out, e_out, order = self._unpack(lst, out, h)
                streams = [h_out] + ([e_out] if e_out is not None else [])
                if call.returned is not None:
                    call.returned[g] = (streams, order)
            if g == self.last_fn:
                self._decide(call, h_out, streams)
            if g == self.last_mid:
                return self._finish(call, streams, order)
            return out

        return forward

    def _decide(self, call: _Call, h_out: torch.Tensor, streams: list) -> None:
        """Fn has run: its residual decides this call (one pre_step, as the graph runs)."""
        call.base = streams
        if self.group is not None and h_out.shape != call.h_in.shape:
            call.h_in = ranks.own_shard(call.h_in, h_out, self.group)
        call.fn_res = h_out - call.h_in
        call.chain = self._chain_for(call.fn_res, call.base)
        call.pre = pre_step(call.chain.layout, call.fn_res, call.timestep, call.latent, *call.chain.state.ordered())

    @staticmethod
    def _returns_e(lst: BlockList) -> bool:
        """Whether the blocks return E (a stream of the middle) rather than only read it; needed before
        the first block runs when Fn is empty."""
        order = lst.order or lst.source_order
        if order is None:
            raise NoCacheableChain(f"{lst.path}: with Fn_compute_blocks=0 the eager cache needs the blocks' return "
                                   "order before they run; pin it with BlockAdapter(forward_pattern=...)")
        return "E" in order or "encoder_hidden_states" in order

    def _finish(self, call: _Call, outs: list, order: list[str]):
        """The middle's outputs for this call: computed (``outs``) or forecast, and the state updated."""
        chain = call.chain
        layout, pre = chain.layout, call.pre
        ref, *ladders = (chain.state.tensors[n] for n in layout.stored_names())
        history = [chain.state.tensors[n] for n in layout.history_names()]
        if call.cached:
            out = cached_step(layout, call.base, pre.branch, pre.ladder_len, pre.distance, ref, ladders, history)
        else:
            out = computed_step(layout, pre.use_cache, pre.step, pre.branch, pre.ladder_len, pre.distance,
                                call.fn_res, outs, call.base, ref, ladders, history)
        post_step(layout, pre, out.finite, out.rows, *chain.state.ordered(), logged=out.logged)
        mixed = out.outs
        return self._pack(mixed[0], mixed[1] if len(mixed) > 1 else None, order)

    def _chain_for(self, fn_res: torch.Tensor, base: list) -> CachedChain:
        """The state for this call's shapes (a new shape gets its own, as it gets its own graph)."""
        latent = self.call.latent
        key = tuple((tuple(t.shape), t.dtype) for t in [fn_res, *base, *([latent] if latent is not None else [])])
        if key not in self._chains:
            cache, calib = self.handle.cache_config, self.handle.calibrator_config
            layout = chain_layout((fn_res.shape, fn_res.dtype),
                                  [(t.shape, t.dtype, role) for t, role in zip(base, ("H", "E"))], cache, calib,
                                  self.separate_cfg, self.call.timestep is not None,
                                  (latent.shape, latent.dtype) if latent is not None else None, self.group)
            first = self.lists[0]
            pattern = ForwardPattern.Pattern_3 if len(base) == 1 else ForwardPattern.Pattern_0
            if first.order == ["encoder_hidden_states", "hidden_states"] or first.source_order == ["E", "H"]:
                pattern = ForwardPattern.Pattern_1
            about = ChainAbout(self.name, str(int(first.pattern or pattern)), self.n,
                               cache.Fn_compute_blocks, cache.Bn_compute_blocks)
            chain = CachedChain(about, layout, ChainState(layout, cache, device=fn_res.device))
            self._chains[key] = chain
            self.handle.add(CompiledGraph([chain]))
        return self._chains[key]
