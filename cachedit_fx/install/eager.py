"""The eager cache: DBCache on one block list through hooks on its blocks, decided on the host.

For models whose blocks cannot be captured at all: a host sync in a block's *own* forward (``if
x.abs().max().item() > ...``) breaks Dynamo's graph inside every block, and islands cannot isolate a
block from itself. The blocks then run as they are, wrapped: Fn runs, its residual goes through the
same :func:`~cachedit_fx.runtime.step.pre_step` the graph runs, the middle blocks are skipped (identity on
their streams) or run, and :func:`~cachedit_fx.runtime.step.post_step` updates the state. On a model both paths
can run, the decisions are the graph path's.

The chain is one ``ModuleList`` whose blocks feed each other directly (no glue between them), as in the
graph path; a block's first argument is H, its ``encoder_hidden_states`` argument E, and the order of
what it returns comes from its forward pattern (a BlockAdapter's, the block's ``return`` statement, or
the output shapes).
"""
from __future__ import annotations

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

    @property
    def cached(self) -> bool:
        return self.pre is not None and bool(self.pre.pred)


class EagerCache:
    """Hooks on one block list that cache its middle blocks; states per input shape, in ``handle``."""

    def __init__(self, blocks: torch.nn.ModuleList, path: str, handle: CacheHandle, separate_cfg: SeparateCFG,
                 pattern: ForwardPattern | None = None, group: str | None = None):
        cache = handle.cache_config
        n, fn, bn = len(blocks), cache.Fn_compute_blocks, cache.Bn_compute_blocks
        if fn + bn > n:
            raise ConfigError(f"Fn_compute_blocks={fn}, Bn_compute_blocks={bn} do not fit chain {path}[{n}] of {n} "
                              f"blocks: need {cache.MIN_FN} <= Fn, 0 <= Bn and Fn + Bn <= {n}")
        if fn + bn == n:
            raise NoCacheableChain(f"chain {path}[{n}]: the middle segment is empty (Fn + Bn == number of blocks)")
        self.blocks, self.path, self.handle, self.separate_cfg = blocks, path, handle, separate_cfg
        self.last_fn, self.first_mid, self.last_mid = fn - 1, fn, n - bn - 1
        self.pattern, self.group = pattern, group
        self.call = _Call()
        self._chains: dict[tuple, CachedChain] = {}
        cls = type(blocks[0])
        self._signature = inspect.signature(cls.forward)
        self._h_name = list(self._signature.parameters)[1]
        self._order = list(pattern.Out) if pattern is not None else None
        self._source_order = return_order(cls)
        for i, block in enumerate(blocks):
            block.forward = self._wrap(i, block)

    def uninstall(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self._chains.clear()

    def begin(self, timestep: torch.Tensor | None, latent: torch.Tensor | None) -> None:
        self.call = _Call(timestep=timestep, latent=latent, active=True)

    def end(self) -> None:
        self.call = _Call()

    # ------------------------------------------------------------------ streams

    def _streams_in(self, args, kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        bound = self._signature.bind(None, *args, **kwargs).arguments
        return bound[self._h_name], bound.get(_E)

    def _unpack(self, out, h_in) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """(H, E or None, the output's order as "H"/"E") of a block's return value."""
        if isinstance(out, torch.Tensor):
            return out, None, ["H"]
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise NoCacheableChain(f"{self.path}: a block returns {type(out).__name__}, not a tensor or a pair")
        order = self._output_order(out, h_in)
        h, e = (out[0], out[1]) if order == ["H", "E"] else (out[1], out[0])
        return h, e, order

    def _output_order(self, out, h_in) -> list[str]:
        if self._order is not None:
            return ["H" if name == "hidden_states" else "E" for name in self._order]
        if self._source_order is not None:
            return self._source_order
        fits = [isinstance(o, torch.Tensor) and o.shape == h_in.shape for o in out]
        if fits.count(True) != 1:
            raise ConfigError(f"{self.path}: cannot tell which output of its blocks is hidden_states; pin it with "
                              "BlockAdapter(forward_pattern=...)")
        return ["H", "E"] if fits[0] else ["E", "H"]

    @staticmethod
    def _pack(h, e, order):
        if order == ["H"]:
            return h
        return (h, e) if order == ["H", "E"] else (e, h)

    # ------------------------------------------------------------------ the hooks

    def _wrap(self, i: int, block: torch.nn.Module):
        original = block.forward

        def forward(*args, **kwargs):
            call = self.call
            if not call.active:
                return original(*args, **kwargs)
            h, e = self._streams_in(args, kwargs)
            if i == 0:
                call.h_in = h
                if self.last_fn < 0:  # no Fn (MagCache): decide before the first block
                    self._decide(call, h, [h] + ([e] if e is not None and self._returns_e(h, e) else []))
            if self.first_mid <= i <= self.last_mid and call.cached:
                order = ["H"] if call.base and len(call.base) == 1 else self._output_order((h, e), h)
                if i < self.last_mid:
                    return self._pack(h, e, order)
                return self._finish(call, call.base, order)
            out = original(*args, **kwargs)
            if i == self.last_fn:
                h_out, e_out, _ = self._unpack(out, h)
                if self.group is not None and h_out.shape != call.h_in.shape:
                    call.h_in = ranks.own_shard(call.h_in, h_out, self.group)
                self._decide(call, h_out, [h_out] + ([e_out] if e_out is not None else []))
            if i == self.last_mid:
                h_out, e_out, order = self._unpack(out, h)
                return self._finish(call, [h_out] + ([e_out] if e_out is not None else []), order)
            return out

        return forward

    def _decide(self, call: _Call, h_fn: torch.Tensor, base: list) -> None:
        """Fn has run (or is empty): the call's state and decision."""
        call.base = base
        call.fn_res = h_fn - call.h_in
        call.chain = self._chain_for(call.fn_res, call.base)
        call.pre = pre_step(call.chain.layout, call.fn_res, call.timestep, call.latent, *call.chain.state.ordered())

    def _returns_e(self, h, e) -> bool:
        """Whether the blocks return E (a stream of the middle) rather than only read it; needed before
        the first block runs when Fn is empty."""
        order = self._order or self._source_order
        if order is None:
            raise NoCacheableChain(f"{self.path}: with Fn_compute_blocks=0 the eager cache needs the blocks' return "
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
            n = len(self.blocks)
            pattern = ForwardPattern.Pattern_3 if len(base) == 1 else ForwardPattern.Pattern_0
            if self._order == ["encoder_hidden_states", "hidden_states"] or self._source_order == ["E", "H"]:
                pattern = ForwardPattern.Pattern_1
            about = ChainAbout(f"{self.path}[{n}]", str(int(self.pattern or pattern)), n,
                               cache.Fn_compute_blocks, cache.Bn_compute_blocks)
            chain = CachedChain(about, layout, ChainState(layout, cache, device=fn_res.device))
            self._chains[key] = chain
            self.handle.add(CompiledGraph([chain]))
        return self._chains[key]
