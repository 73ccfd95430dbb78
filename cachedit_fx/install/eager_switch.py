"""The switch to the eager cache: when a transformer's blocks cannot be compiled into a graph (their own
forward breaks it, weight offload hooks move weights in every block call) or the user asks for it,
hooks on one block list cache its middle blocks instead (eager.py), with one warning naming the cause."""
from __future__ import annotations

import warnings

import torch

from ..config import PinnedList, is_prune
from ..errors import ConfigError, NoCacheableChain
from ..runtime import ranks
from .calls import call_inputs
from .eager import EagerCache
from .eager_prune import EagerPrune
from .modes import InstallState, Mode


def largest_block_list(module: torch.nn.Module) -> str | None:
    """The path of the ModuleList (of two or more blocks) holding the most parameters: the backbone."""
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in module.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) >= 2]
    return max(lists)[1] if lists else None


class EagerSwitch:
    """Starts, runs and stops the eager cache of one install."""

    def __init__(self, state: InstallState, pinned: tuple[PinnedList, ...]):
        self.state, self.pinned = state, pinned
        self.cache: EagerCache | EagerPrune | None = None

    def start(self, path: str | None, reason: str | None) -> None:
        """Cache the block list at ``path`` (the pinned one, else the largest) eagerly from now on; a
        ``reason`` is warned about once. A chain the eager cache cannot hold leaves the model uncached."""
        state, module = self.state, self.state.module
        if len(self.pinned) > 1:
            raise ConfigError(f"the eager cache caches one block list; the BlockAdapter names "
                              f"{[p.path for p in self.pinned]}: pin one")
        pattern = self.pinned[0].pattern if self.pinned else None
        path = path or (self.pinned[0].path if self.pinned else largest_block_list(module))
        if path is None:
            raise ConfigError(f"{type(module).__name__} has no ModuleList of two or more blocks to cache eagerly")
        handle = state.handle
        group = ranks.model_group(module)
        if group is not None:
            ranks.check_same_config(group, handle.cache_config, handle.calibrator_config)
        try:
            kind = EagerPrune if is_prune(handle.cache_config) else EagerCache
            self.cache = kind(module.get_submodule(path), path, handle, state.options["separate_cfg"], pattern, group)
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

    def stop(self) -> None:
        if self.cache is not None:
            self.cache.uninstall()
            self.cache = None
