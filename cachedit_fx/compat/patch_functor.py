"""cache-dit's ``PatchFunctor``: a model patch (new block or transformer forwards) applied before the
cache. ``BlockAdapter(patch_functor=...)`` applies it when the adapter is made, as cache-dit does; the
graph the cache then analyses is the patched forward's. cache-dit's own functors (``FluxPatchFunctor``
...) follow the same ``apply`` contract and work here too."""
from __future__ import annotations

import abc
import os
import warnings

import torch

# cache-dit's switch to patch transformers that do not come from diffusers.
DISABLE_DIFFUSERS_CHECK = "CACHE_DIT_PATCH_FUNCTOR_DISABLE_DIFFUSERS_CHECK"


class PatchFunctor(abc.ABC):
    """Subclasses implement ``_apply(transformer, *args, **kwargs) -> transformer`` and set
    ``transformer._is_patched = True``."""

    def apply(self, transformer: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
        """Patch ``transformer`` unless it is patched already, does not come from diffusers (cache-dit's
        environment switch lifts that), or is parallelised; returns it."""
        skip = ("it is patched already" if getattr(transformer, "_is_patched", False) else
                "it does not come from diffusers" if not self.is_from_diffusers(transformer) else
                "it is parallelised" if getattr(transformer, "_is_parallelized", False) else None)
        if skip is not None:
            warnings.warn(f"cachedit: {type(self).__name__} not applied to {type(transformer).__name__}: {skip}",
                          stacklevel=2)
            return transformer
        return self._apply(transformer, *args, **kwargs)

    @abc.abstractmethod
    def _apply(self, transformer: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
        """The patch itself: the patched ``transformer``."""

    @classmethod
    def is_from_diffusers(cls, transformer: torch.nn.Module) -> bool:
        return os.environ.get(DISABLE_DIFFUSERS_CHECK, "0") not in ("", "0") or \
            type(transformer).__module__.startswith("diffusers")
