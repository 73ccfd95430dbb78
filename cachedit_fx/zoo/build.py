"""Build a zoo family's pipeline or bare transformer, and run a pipeline with its call arguments."""
from __future__ import annotations

import importlib
import importlib.util

import torch

from ..errors import ConfigError, MissingDependency
from .family import FAMILY_NAMES, ZOO_MODULES, Family


def get(name: str) -> Family:
    if name not in FAMILY_NAMES:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of: {', '.join(FAMILY_NAMES)}")
    missing = [m for m in ZOO_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"the offline zoo builds its tokenizers and text encoders with {' and '.join(missing)}: "
                                "pip install 'cachedit-fx[zoo]' (the command line's extra, [cli], includes it)")
    return importlib.import_module(f"{__package__}.recipes.{name}").FAMILY


def families() -> list[Family]:
    return [get(n) for n in FAMILY_NAMES]


def family_for_transformer(cls: type) -> Family | None:
    """The family whose transformer is an instance of ``cls`` (by class name), or None."""
    return next((f for f in families() if f.transformer_class == cls.__name__), None)


def build_pipeline(name: str):
    return get(name).build_pipeline()


def build_transformer(name: str, seed: int = 0):
    """The family's transformer (from its pipeline) and the kwargs of one call."""
    fam = get(name)
    transformer = fam.build_pipeline().transformer
    return transformer, fam.transformer_inputs(transformer, seed)


def run_pipeline(pipe, name: str, num_inference_steps: int = 4, seed: int = 0, **overrides):
    kwargs = {**get(name).pipeline_kwargs(), **overrides}
    out = pipe(num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    return _first_output(out)


def _first_output(out):
    for key in ("images", "frames"):
        if hasattr(out, key):
            value = getattr(out, key)
            return torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
    return out[0]
