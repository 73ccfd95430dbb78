"""The eager cache for DBPrune: hooks on one block list prune its blocks one by one, decided on the host.

The same functions as the graph path (runtime/prune.py) on the same state table: the first block's call
starts the call (:func:`~cachedit_fx.runtime.prune.begin`), each prunable block's call decides
(:func:`~cachedit_fx.runtime.prune.block_pre`, read on the host) and either returns its streams plus
its stored residuals without running, or runs and stores its input and residuals. The blocks of one
``ModuleList`` feed each other directly, so every block takes and returns streams of the first block's
shapes; its output order comes from its forward pattern (a BlockAdapter's, the block's ``return``
statement, or the output shapes), as in eager.py.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..compat.forward_pattern import ForwardPattern
from ..config import SeparateCFG
from ..errors import ConfigError, NoCacheableChain
from ..passes.patterns import return_order
from ..runtime.chain_state import ChainState
from ..runtime.handle import CacheHandle, CachedChain, CompiledGraph
from ..runtime.layout import ChainAbout
from ..runtime.prune import begin, block_post, block_pre, computed_block, pruned_block
from ..runtime.prune_layout import PrunedBlock, prune_layout

_E = "encoder_hidden_states"


@dataclass
class _Call:
    timestep: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    chain: CachedChain | None = None
    call: torch.Tensor | None = None  # [branch, step] from begin()
    order: list[str] | None = None  # the blocks' outputs as "H" / "E"
    active: bool = False


class EagerPrune:
    """Hooks on one block list that prune its blocks (DBPrune); states per input shape, in ``handle``. The
    transformer's hook starts and ends each call (``begin`` / ``end``); ``self.call`` is the one in flight."""

    broken: str | None = None  # EagerCache's reason its joined lists cannot cache; one list always can

    def __init__(self, blocks: torch.nn.ModuleList, path: str, handle: CacheHandle, separate_cfg: SeparateCFG,
                 pattern: ForwardPattern | None = None, group: str | None = None):
        if group is not None:
            raise NoCacheableChain("DBPrune runs in one process (cache-dit refuses context parallelism too)")
        cache = handle.cache_config
        self.prunable = cache.prunable(len(blocks))
        if not self.prunable:
            raise NoCacheableChain(f"chain {path}[{len(blocks)}]: no block to prune (Fn_compute_blocks="
                                   f"{cache.Fn_compute_blocks}, Bn_compute_blocks={cache.Bn_compute_blocks}, "
                                   f"non_prune_block_ids={cache.non_prune_block_ids})")
        cls = type(blocks[0])
        self._signature = inspect.signature(cls.forward)
        self._h_name = list(self._signature.parameters)[1]
        self._order = (["H" if n == "hidden_states" else "E" for n in pattern.Out] if pattern is not None
                       else return_order(cls))
        if _E not in self._signature.parameters and self._order is not None and len(self._order) == 2:
            raise NoCacheableChain(f"{path}: its blocks create encoder_hidden_states (pattern 4/5); DBPrune cannot "
                                   "skip a block whose output continues none of its inputs")
        self.blocks, self.path, self.handle, self.separate_cfg, self.pattern = blocks, path, handle, separate_cfg, \
            pattern
        self.call = _Call()
        self._chains: dict[tuple, CachedChain] = {}
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block)

    def uninstall(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self._chains.clear()

    def begin(self, timestep: torch.Tensor | None, latent: torch.Tensor | None) -> None:
        self.call = _Call(timestep=timestep, latent=latent, active=True)

    def end(self) -> None:
        self.call = _Call()

    def _wrap(self, i: int, block: torch.nn.Module):
        original = block.forward
        k = self.prunable.index(i) if i in self.prunable else None

        def forward(*args, **kwargs):
            call = self.call
            if not call.active:
                return original(*args, **kwargs)
            bound = self._signature.bind(None, *args, **kwargs).arguments
            h, e = bound[self._h_name], bound.get(_E)
            if call.call is None:  # the first block of the call (never prunable: Fn >= 1)
                out = original(*args, **kwargs)
                self._start(call, h, e, out)
                return out
            if k is None:
                return original(*args, **kwargs)
            chain = call.chain
            layout, state = chain.layout, chain.state
            stored = [state.tensors[n] for n in layout.stored_names(k)]
            bases = [h, e][:len(call.order)]
            if bool(block_pre(layout, k, h, call.call, *state.ordered())):
                outs = pruned_block(layout, bases, call.call[:1], stored)[:len(bases)]
                return self._pack(call, outs)
            out = original(*args, **kwargs)
            outs = self._unpack(call, out)
            block_post(call.call, computed_block(h, outs, bases)[len(outs):], *stored)
            return out

        return forward

    def _start(self, call: _Call, h: torch.Tensor, e: torch.Tensor | None, out) -> None:
        """Learn the blocks' output order from the first block's output, pick the state for these shapes
        and start the call."""
        if isinstance(out, torch.Tensor):
            call.order = ["H"]
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            fits = [isinstance(o, torch.Tensor) and o.shape == h.shape for o in out]
            if self._order is None and fits.count(True) != 1:
                raise ConfigError(f"{self.path}: cannot tell which output of its blocks is hidden_states; pin it with "
                                  "BlockAdapter(forward_pattern=...)")
            call.order = self._order or (["H", "E"] if fits[0] else ["E", "H"])
        else:
            raise NoCacheableChain(f"{self.path}: a block returns {type(out).__name__}, not a tensor or a pair")
        streams = [h] if len(call.order) == 1 else [h, e]
        call.chain = self._chain_for(streams, call.latent, call.timestep is not None)
        call.call = begin(call.chain.layout, call.timestep, call.latent, *call.chain.state.ordered())

    def _unpack(self, call: _Call, out) -> list[torch.Tensor]:
        if len(call.order) == 1:
            return [out]
        return [out[0], out[1]] if call.order == ["H", "E"] else [out[1], out[0]]

    @staticmethod
    def _pack(call: _Call, outs):
        if len(call.order) == 1:
            return outs[0]
        return (outs[0], outs[1]) if call.order == ["H", "E"] else (outs[1], outs[0])

    def _chain_for(self, streams: list[torch.Tensor], latent: torch.Tensor | None, sees_timestep: bool) -> CachedChain:
        """The state for this call's shapes (a new shape gets its own, as it gets its own graph)."""
        key = tuple((tuple(t.shape), t.dtype) for t in [*streams, *([latent] if latent is not None else [])])
        if key not in self._chains:
            cache, h = self.handle.cache_config, streams[0]
            specs = [PrunedBlock(j, tuple(h.shape), h.dtype, tuple((tuple(t.shape), t.dtype) for t in streams))
                     for j in self.prunable]
            layout = prune_layout(specs, len(self.blocks), cache, self.separate_cfg, sees_timestep,
                                  (tuple(latent.shape), latent.dtype) if latent is not None else None)
            pattern = ForwardPattern.Pattern_3 if len(streams) == 1 else ForwardPattern.Pattern_0
            about = ChainAbout(f"{self.path}[{len(self.blocks)}]", str(int(self.pattern or pattern)), len(self.blocks),
                               cache.Fn_compute_blocks, cache.Bn_compute_blocks)
            chain = CachedChain(about, layout, ChainState(layout, cache, device=h.device))
            self._chains[key] = chain
            self.handle.add(CompiledGraph([chain]))
        return self._chains[key]
