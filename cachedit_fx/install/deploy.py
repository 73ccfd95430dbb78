"""What ``enable_cache`` applies after the cache, in cache-dit 1.5.3's order: the attention backend,
parallelism, quantization. Each changes the model before its first call, and the cache compiles lazily
at that call, so the one graph captures the sharded, quantized model either way round."""
from __future__ import annotations

import torch
from diffusers.utils import logging as diffusers_logging

from ..config import ParallelismConfig, QuantizeConfig, coerce
from ..errors import ConfigError
from .parallel import enable_parallelism, set_attention_backend
from .quantize import quantize

logger = diffusers_logging.get_logger("diffusers.cachedit_fx")


def _components(pipe, config: QuantizeConfig) -> list[tuple[str, torch.nn.Module, QuantizeConfig]]:
    """(name, module, its config) per entry of ``components_to_quantize`` (names are pipeline attributes,
    or modules given directly)."""
    out = []
    for single in QuantizeConfig.expand_configs(config):
        (component,) = single.components_to_quantize
        if isinstance(component, torch.nn.Module):
            out.append((type(component).__name__, component, single))
            continue
        module = getattr(pipe, component, None) if pipe is not None else None
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"QuantizeConfig.components_to_quantize: {type(pipe).__name__} has no module "
                              f"{component!r}")
        out.append((component, module, single))
    return out


def deploy(transformers: list[torch.nn.Module], pipe, parallelism_config=None, attention_backend: str | None = None,
           quantize_config=None) -> None:
    """Apply the deployment options of an ``enable_cache`` call to the transformers (and, for
    ``components_to_quantize``, the pipeline's other components).

    Args:
        transformers: the transformers enable_cache reached (a pipeline's transformer / transformer_2).
        pipe: the pipeline, or None for a bare transformer.
        parallelism_config: a ``ParallelismConfig`` (or a dict of its fields).
        attention_backend: a diffusers attention backend name.
        quantize_config: a ``QuantizeConfig`` (or a dict of its fields).
    """
    parallel = coerce(parallelism_config, ParallelismConfig, "parallelism_config")
    quant = coerce(quantize_config, QuantizeConfig, "quantize_config")
    if attention_backend is not None and parallel is not None:
        if parallel.attention_backend is not None:  # cache-dit prefers the parallelism config's, and says so
            logger.warning("cachedit: attention_backend=%r and parallelism_config.attention_backend=%r are both "
                           "given; using the parallelism config's", attention_backend, parallel.attention_backend)
        else:
            parallel.attention_backend = attention_backend
    elif attention_backend is not None:
        for transformer in transformers:
            set_attention_backend(transformer, attention_backend)
    for transformer in transformers if parallel is not None else ():
        enable_parallelism(transformer, parallel)
    if quant is None:
        return
    if quant.components_to_quantize is None:
        for transformer in transformers:
            quantize(transformer, quant)
        return
    for _, module, config in _components(pipe, quant):
        quantize(module, config)
