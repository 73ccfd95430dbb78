"""cache-dit's ``BlockAdapterRegister``: adapters registered under a class-name prefix, which
``enable_cache(pipe)`` uses for a pipeline (or transformer) of a matching class, as cache-dit does.

cache-dit ships ~45 predefined adapters, one per model family; cachedit-fx ships none, because the
graph shows the blocks (``cachedit_fx.supported_pipelines()`` lists what caches, from the coverage run).
What users register works as in cache-dit: ``get_adapter`` builds it, ``enable_cache`` pins its chain.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .adapter import BlockAdapter


class FakeDiffusionPipeline:
    """cache-dit's stand-in pipeline around a bare transformer, handed to adapter factories."""

    def __init__(self, transformer: torch.nn.Module | None = None):
        self.transformer = transformer


class BlockAdapterRegister:
    """Adapter factories by class-name prefix (cache-dit's class-level registry)."""

    _adapters: dict[str, Callable[..., BlockAdapter]] = {}
    # cache-dit's pipelines with a separate unconditional call, for has_separate_cfg() only: the cache
    # itself names each call's CFG branch from diffusers' cache_context (docs/usage.md).
    _predefined_adapters_has_separate_cfg: list[str] = [
        "QwenImage", "Wan", "CogView4", "Cosmos", "SkyReelsV2", "Chroma", "Lumina2", "Kandinsky5", "ChronoEdit",
        "HunyuanVideo15", "OvisImage", "BooguImage", "JoyImage"]

    @classmethod
    def register(cls, name: str, supported: bool = True):
        """Decorator: register ``factory(pipe, **kwargs) -> BlockAdapter`` under the prefix ``name``."""

        def decorator(factory: Callable[..., BlockAdapter]) -> Callable[..., BlockAdapter]:
            if supported:
                cls._adapters[name] = factory
            return factory

        return decorator

    @classmethod
    def _factory(cls, obj: Any) -> Callable[..., BlockAdapter] | None:
        name = obj if isinstance(obj, str) else type(obj).__name__
        return next((f for prefix, f in cls._adapters.items() if name.startswith(prefix)), None)

    @classmethod
    def get_adapter(cls, pipe_or_module: Any, **kwargs) -> BlockAdapter | None:
        """The registered adapter for a pipeline, a transformer (wrapped in a ``FakeDiffusionPipeline``)
        or a class name; None when no prefix matches."""
        factory = cls._factory(pipe_or_module)
        if factory is None:
            return None
        if isinstance(pipe_or_module, torch.nn.Module):
            pipe_or_module = FakeDiffusionPipeline(pipe_or_module)
        return factory(pipe_or_module, **kwargs)

    @classmethod
    def is_supported(cls, pipe_or_module: Any) -> bool:
        return cls._factory(pipe_or_module) is not None

    @classmethod
    def has_separate_cfg(cls, pipe_or_adapter_or_module: Any) -> bool:
        """Whether the pipeline runs its CFG branches as separate calls: a BlockAdapter's flag, a
        registered adapter's, or cache-dit's list of such pipelines."""
        if isinstance(pipe_or_adapter_or_module, BlockAdapter):
            return pipe_or_adapter_or_module.has_separate_cfg
        if isinstance(pipe_or_adapter_or_module, FakeDiffusionPipeline):
            return False
        adapter = cls.get_adapter(pipe_or_adapter_or_module, skip_post_init=True) \
            if cls.is_supported(pipe_or_adapter_or_module) else None
        if adapter is not None and adapter.has_separate_cfg:
            return True
        name = type(pipe_or_adapter_or_module).__name__
        return any(name.startswith(prefix) for prefix in cls._predefined_adapters_has_separate_cfg)

    @classmethod
    def supported_pipelines(cls, **kwargs) -> tuple[int, list[str]]:
        """(count, prefixes) of the registered adapters."""
        return len(cls._adapters), list(cls._adapters)
