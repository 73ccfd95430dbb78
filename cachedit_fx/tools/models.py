"""The models the command line works on: a zoo family name (``flux``), ``package.module:Class`` with a
diffusers-style config JSON (random weights), or a local diffusers model folder (``config.json`` with
``_class_name``, loaded with ``from_pretrained``). Example inputs come from the zoo family whose
transformer class the model is.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError


@dataclass
class LoadedModel:
    transformer: torch.nn.Module
    inputs: dict
    family: Any  # zoo.Family
    label: str


def _import(spec: str, what: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what} {spec!r}: expected package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {spec!r}: cannot import module {module_name!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
    return obj


def _import_class(spec: str) -> type:
    obj = _import(spec, "model")
    if not isinstance(obj, type) or not issubclass(obj, torch.nn.Module):
        raise ConfigError(f"model {spec!r}: {spec.partition(':')[2]} is not a torch.nn.Module class")
    return obj


def is_import_path(spec: str | None) -> bool:
    """``package.module:Name`` rather than a file or folder."""
    return bool(spec) and ":" in spec and not os.path.exists(spec)


def model_from_factory(spec: str) -> torch.nn.Module:
    """The module a ``package.module:Factory`` callable (a function or a module class) returns, in eval mode."""
    factory = _import(spec, "--config factory")
    if not callable(factory):
        raise ConfigError(f"--config factory {spec!r} is not callable")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--config factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def example_tensors(items: list[str]) -> dict[str, torch.Tensor]:
    """``NAME=SHAPE[:DTYPE]`` items (``x=1x64x16``, ``t=1``, ``ids=64x3:int64``) as example tensors:
    floats uniform in [0, 1), integers zero."""
    out = {}
    for item in items:
        name, _, rest = item.partition("=")
        shape, _, dtype_name = rest.partition(":")
        try:
            dims = [int(d) for d in shape.split("x")] if shape else []
        except ValueError:
            dims = None
        dtype = getattr(torch, dtype_name or "float32", None)
        if not name or dims is None or any(d < 0 for d in dims) or not isinstance(dtype, torch.dtype):
            raise ConfigError(f"--args {item!r}: expected NAME=SHAPE[:DTYPE], e.g. x=1x64x16 or ids=64x3:int64")
        g = torch.Generator().manual_seed(len(out))
        out[name] = torch.rand(dims, generator=g).to(dtype) if dtype.is_floating_point else torch.zeros(dims,
                                                                                                        dtype=dtype)
    return out


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object (a diffusers-style config dict)")
    return data


def _instantiate(cls: type, config: dict, where: str) -> torch.nn.Module:
    try:
        if hasattr(cls, "from_config"):  # diffusers ConfigMixin: ignores _class_name / _diffusers_version
            return cls.from_config(config)
        return cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}(**config) from {where} failed: {e}") from None


def _no_inputs(cls: type) -> ConfigError:
    from .. import zoo

    known = ", ".join(sorted(f.transformer_class for f in zoo.families()))
    return ConfigError(f"no example inputs for {cls.__module__}.{cls.__name__}: only the zoo families' transformer "
                      f"classes have them ({known})")


def load_model(spec: str, config: str | None = None, seed: int = 0) -> LoadedModel:
    """A transformer and the kwargs of one call, from a zoo name, ``package.module:Class`` + config
    JSON, or a local diffusers model folder."""
    from .. import zoo

    if config is not None and not (":" in spec and not os.path.exists(spec)):
        raise ConfigError(f"--config needs MODEL as package.module:Class (got {spec!r})")
    if ":" in spec and not os.path.exists(spec):
        cls = _import_class(spec)
        if config is None:
            raise ConfigError(f"model {spec!r}: a package.module:Class model needs --config cfg.json")
        family = zoo.family_for_transformer(cls)
        if family is None:
            raise _no_inputs(cls)
        torch.manual_seed(seed)
        model = _instantiate(cls, _read_json(config, "config file"), config)
        label = f"{cls.__name__} (random weights from {os.path.basename(config)})"
    elif os.path.isdir(spec):
        cfg = _read_json(os.path.join(spec, "config.json"), "config.json of model folder")
        name = cfg.get("_class_name")
        if not isinstance(name, str):
            raise ConfigError(f"model folder {spec}: config.json has no _class_name (not a diffusers model folder)")
        import diffusers

        cls = getattr(diffusers, name, None)
        if not isinstance(cls, type):
            raise ConfigError(f"model folder {spec}: _class_name {name!r} is not a diffusers class")
        family = zoo.family_for_transformer(cls)
        if family is None:
            raise _no_inputs(cls)
        try:
            model = cls.from_pretrained(spec, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ConfigError(f"model folder {spec}: {name}.from_pretrained failed: {str(e).splitlines()[0]}") from None
        label = f"{name} from {spec}"
    elif os.sep in spec or spec.startswith(".") or spec.endswith(".json"):
        raise FileNotFoundError(f"no such model folder: {spec}")
    else:
        transformer, inputs = zoo.build_transformer(spec)  # ValueError for unknown names
        return LoadedModel(transformer, inputs, zoo.get(spec), spec)
    model = model.eval()
    return LoadedModel(model, family.transformer_inputs(model, seed), family, label)
