"""The caller-owned state tensors of one chain, laid out by :meth:`ChainLayout.fields`; the compiled
graph (or the eager cache) mutates them in place."""
from __future__ import annotations

import torch

from ..config import DBCacheConfig
from .layout import ChainLayout


class ChainState:
    """Caller-owned state tensors of one chain; the compiled graph mutates them in place."""

    def __init__(self, layout: ChainLayout, cache_config: DBCacheConfig, device=None):
        self.layout = layout
        self.tensors = {f.name: torch.empty(f.shape, dtype=f.dtype, device=device) for f in layout.fields()}
        self.configure(cache_config)
        self.reset()

    def configure(self, cache_config: DBCacheConfig) -> None:
        """Load the request-level numbers (threshold, warmup, mask, MagCache's ratios ...) without touching the graph."""
        for name, values in self.layout.configured(cache_config).items():
            tensor = self.tensors[name]
            tensor.copy_(torch.tensor(values, dtype=tensor.dtype))

    def reset(self) -> None:
        for f in self.layout.fields():
            if f.initial is not None:
                self.tensors[f.name].fill_(f.initial)

    def ordered(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self.layout.names()]
