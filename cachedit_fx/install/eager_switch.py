"""The switch to the eager cache: when a transformer's blocks cannot be compiled into a graph (their own
forward breaks it, weight offload hooks move weights in every block call) or the user asks for it,
hooks on the chain's block lists cache its middle blocks instead (eager.py), with one warning naming the cause."""
from __future__ import annotations

import warnings

import torch

from ..config import PinnedList, is_prune
from ..errors import ConfigError, NoCacheableChain
from ..runtime import ranks
from .calls import call_inputs
from .eager import BlockList, EagerCache
from .eager_prune import EagerPrune
from .modes import InstallState, Mode


def largest_block_list(module: torch.nn.Module) -> str | None:
    """The path of the ModuleList (of two or more blocks) holding the most parameters: the backbone."""
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in module.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) >= 2]
    return max(lists)[1] if lists else None


def chain_lists_from(module: torch.nn.Module, path: str, pinned: tuple[PinnedList, ...]) -> list[BlockList]:
    """The block lists an eager chain may join, in order: the pinned ones, else the list at ``path`` and
    the lists of two or more blocks registered after it beside it (Flux's ``single_transformer_blocks``
    after ``transformer_blocks``); the first call keeps those each fed directly by the one before."""
    if pinned:
        return [BlockList(p.path, module.get_submodule(p.path), p.pattern) for p in pinned]
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path)
    names = [n for n, m in parent.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) >= 2]
    following = names[names.index(name):] if name in names else [name]
    prefix = f"{parent_path}." if parent_path else ""
    return [BlockList(prefix + n, parent.get_submodule(n)) for n in following]


class EagerSwitch:
    """Starts, runs and stops the eager cache of one install."""

    def __init__(self, state: InstallState, pinned: tuple[PinnedList, ...]):
        self.state, self.pinned = state, pinned
        self.cache: EagerCache | EagerPrune | None = None

    def start(self, path: str | None, reason: str | None) -> None:
        """Cache the chain from the block list at ``path`` (the pinned lists, else the largest list and
        the block lists beside it that follow it) eagerly from now on; a ``reason`` is warned about once.
        A chain the eager cache cannot hold leaves the model uncached."""
        state, module = self.state, self.state.module
        path = path or (self.pinned[0].path if self.pinned else largest_block_list(module))
        if path is None:
            raise ConfigError(f"{type(module).__name__} has no ModuleList of two or more blocks to cache eagerly")
        handle = state.handle
        group = ranks.model_group(module)
        if group is not None:
            ranks.check_same_config(group, handle.cache_config, handle.calibrator_config)
        try:
            if is_prune(handle.cache_config):
                pattern = self.pinned[0].pattern if self.pinned else None
                self.cache = EagerPrune(module.get_submodule(path), path, handle, state.options["separate_cfg"],
                                        pattern, group)
            else:
                self.cache = EagerCache(chain_lists_from(module, path, self.pinned), handle,
                                        state.options["separate_cfg"], group)
        except NoCacheableChain as e:
            state.mode = Mode.UNCACHED
            warnings.warn(f"cachedit: {type(module).__name__} runs uncached: {e}", stacklevel=5)
            return
        state.mode = Mode.EAGER
        if reason is not None:
            warnings.warn(f"cachedit: {type(module).__name__} runs the eager cache on {path} (block hooks, decisions "
                          f"on the host, blocks uncompiled): {reason}", stacklevel=5)

    def restart(self) -> None:
        """The same block list with a new config (refresh_context changed a structural field)."""
        path = self.cache.path
        self.stop()
        self.start(path, None)

    def run(self, original, args, kwargs):
        """One call of ``original`` (the transformer's own forward) with the block hooks active."""
        if self.cache is None or torch.is_grad_enabled():  # uncached, or caching is inference-only
            return original(*args, **kwargs)
        self.cache.begin(*call_inputs(original, args, kwargs))
        try:
            return original(*args, **kwargs)
        finally:
            self.cache.end()
            if self.cache.broken is not None:  # the first call found a chain with no middle to cache
                warnings.warn(f"cachedit: {type(self.state.module).__name__} runs uncached: {self.cache.broken}",
                              stacklevel=4)
                self.stop()
                self.state.mode = Mode.UNCACHED

    def stop(self) -> None:
        if self.cache is not None:
            self.cache.uninstall()
            self.cache = None
