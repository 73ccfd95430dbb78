"""``quantize`` / ``enable_cache(quantize_config=...)``: a ``QuantizeConfig`` applied through torchao's
``quantize_``, layer for layer as cache-dit 1.5.3 chooses them (its linears inside the repeated blocks,
its exclusions by name substring, its precision plans), so the same config quantizes the same layers.

torchao is optional (``pip install 'cachedit-fx[quant]'``). What differs from cache-dit on purpose:
the CPU-capable types run on CPU (cache-dit asserts CUDA for every type), the global Inductor settings
torchao's configs would flip (``set_inductor_config``) are left alone, and the zero-row scale fix cache-dit
patches into torchao for good (a zero weight row would otherwise quantize to NaN) is applied only while
the weights are quantized. The quantized weights are tensor subclasses; the graph pass passes them to the
cache decision as their plain tensors (passes/subclass.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib

import torch
from diffusers.utils import logging as diffusers_logging

from ..config import QUANT_TYPES, QuantizeConfig
from ..errors import ConfigError, MissingDependency

logger = diffusers_logging.get_logger("diffusers.cachedit_fx")

# What torchao 0.18.0 runs on a CPU (torchao's own kernels or its dequantize-and-matmul fallback).
CPU_QUANT_TYPES = ("int8_weight_only", "int8_per_row", "int8_per_tensor", "float8_weight_only")
# The CUDA compute capability each other type needs (cache-dit's checks; int4 needs torchao's mslk kernels).
_CAPABILITY = {"float8_per_row": (8, 9), "float8_per_tensor": (8, 9), "float8_per_block": (8, 9),
               "nvfp4": (10, 0), "nvfp4_weight_only": (10, 0), "int4_weight_only": (8, 0)}


def _torchao():
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as e:
        raise MissingDependency("quantize_config needs torchao: pip install 'cachedit-fx[quant]' (torchao==0.18.0, "
                                f"which imports against torch 2.13); import failed with: {e}") from e


def torchao_config(quant_type: str):
    """cache-dit's torchao config for ``quant_type`` (quantization/torchao/quantize_ao.py)."""
    ao = _torchao()
    float8 = torch.float8_e4m3fn
    if quant_type.startswith("float8_per_"):
        granularity = {"float8_per_row": (ao.PerRow(), ao.PerRow()),
                       "float8_per_tensor": (ao.PerTensor(), ao.PerTensor()),
                       "float8_per_block": (ao.PerBlock([1, 128]), ao.PerBlock([128, 128]))}[quant_type]
        extra = {}
        if quant_type == "float8_per_row":
            extra["kernel_preference"] = importlib.import_module(
                "torchao.quantization.quantize_.common").KernelPreference.TORCH
        return ao.Float8DynamicActivationFloat8WeightConfig(weight_dtype=float8, activation_dtype=float8,
                                                            granularity=granularity, set_inductor_config=False,
                                                            **extra)
    if quant_type.startswith("nvfp4"):
        nvfp4 = importlib.import_module("torchao.prototype.mx_formats.inference_workflow")
        if quant_type == "nvfp4":
            return nvfp4.NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=True,
                                                                 use_dynamic_per_tensor_scale=True)
        return nvfp4.NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=True)
    return {"float8_weight_only": lambda: ao.Float8WeightOnlyConfig(weight_dtype=float8, set_inductor_config=False),
            "int8_per_row": lambda: ao.Int8DynamicActivationInt8WeightConfig(granularity=ao.PerRow(),
                                                                            set_inductor_config=False),
            "int8_per_tensor": lambda: ao.Int8DynamicActivationInt8WeightConfig(granularity=ao.PerTensor(),
                                                                               set_inductor_config=False),
            "int8_weight_only": lambda: ao.Int8WeightOnlyConfig(group_size=None, set_inductor_config=False),
            "int4_weight_only": lambda: ao.Int4WeightOnlyConfig(group_size=32, set_inductor_config=False),
            }[quant_type]()


def check_runs_here(module: torch.nn.Module, quant_type: str) -> None:
    """Refuse a quant type the module's device cannot run, before any layer is touched."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    need = _CAPABILITY.get(quant_type)
    if need is None:
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < need:
        raise ConfigError(f"QuantizeConfig.quant_type={quant_type!r} needs a CUDA GPU of compute capability >= "
                          f"{need[0]}.{need[1]} ({type(module).__name__} is on {device}); on this device use one of "
                          f"{', '.join(CPU_QUANT_TYPES)}")
    if quant_type == "float8_per_row":
        wrong = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)
                 and m.weight.dtype != torch.bfloat16]
        if wrong:
            raise ConfigError(f"QuantizeConfig.quant_type='float8_per_row' needs bfloat16 linears; {wrong[0]} is "
                              f"{module.get_submodule(wrong[0]).weight.dtype}")


@dataclasses.dataclass
class _Selection:
    """cache-dit's per-layer choice (``_basic_filter_fn``) for one pass: a linear not yet quantized,
    inside the current precision-plan entry's layers (if any), not excluded."""

    config: QuantizeConfig
    quant_type: str
    only: list[str] | None = None  # a precision-plan pass: the layer-name substrings of its type
    quantized: int = 0

    def __call__(self, module: torch.nn.Module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or getattr(module, "_is_inner_quantized", False):
            return False
        if self.only is not None and not any(s in name for s in self.only):
            return False
        if self.config.filter_fn is not None:
            if not self.config.filter_fn(module, name):
                return False
        elif any(s in name for s in self.config.exclude_layers or ()):
            return False
        if self.quant_type == "float8_per_block" and any(d % 128 for d in module.weight.shape):
            return False
        if self.quant_type.startswith("nvfp4") and any(d % 16 for d in module.weight.shape):
            return False
        module._is_inner_quantized = True
        self.quantized += 1
        return True


@contextlib.contextmanager
def _zero_rows_keep_scale_one(quant_type: str):
    """torchao's float8 scale of an all-zero row is 0, which quantizes the row to NaN; cache-dit makes
    such scales 1 (its patch stays in torchao for good; here only while the weights are quantized)."""
    if "float8" not in quant_type:
        yield
        return
    primitives = importlib.import_module("torchao.quantization.quant_primitives")
    workflow = importlib.import_module("torchao.quantization.quantize_.workflows.float8.float8_tensor")
    original = primitives._choose_scale_float8

    def choose_scale(*args, **kwargs):
        scale = original(*args, **kwargs)
        return torch.where(scale == 0, torch.ones_like(scale), scale)

    primitives._choose_scale_float8 = workflow._choose_scale_float8 = choose_scale
    try:
        yield
    finally:
        primitives._choose_scale_float8 = workflow._choose_scale_float8 = original


def _regions(module: torch.nn.Module, config: QuantizeConfig) -> list[torch.nn.Module]:
    """The submodules quantized one by one: instances of the repeated block classes (diffusers'
    ``_repeated_blocks``, else ``config.repeated_blocks``), or the whole module."""
    repeated = getattr(module, "_repeated_blocks", None) or config.repeated_blocks or None
    if not config.regional_quantize or not repeated:
        return [module]
    found = [m for m in module.modules() if type(m).__name__ in repeated]
    if not found:
        raise ConfigError(f"QuantizeConfig.repeated_blocks: no {repeated} inside {type(module).__name__} "
                          "(regional_quantize=True quantizes inside them; set regional_quantize=False for the "
                          "whole module)")
    return found


def quantize(module: torch.nn.Module, quantize_config: QuantizeConfig | None = None, **kwargs) -> torch.nn.Module:
    """Quantize ``module``'s linears in place as cache-dit does; returns ``module``.

    Args:
        module: a transformer (or any module).
        quantize_config: the :class:`QuantizeConfig`; without it, cache-dit's legacy keywords (``quant_type=...``).

    Raises:
        ConfigError: the quant type cannot run on the module's device, or no repeated block is found.
        MissingDependency: torchao is not installed.
    """
    config = quantize_config if quantize_config is not None else QuantizeConfig.from_kwargs(**kwargs)
    if getattr(module, "_is_quantized", False):
        logger.warning("cachedit: %s is already quantized; skipping", type(module).__name__)
        return module
    quantize_ = _torchao().quantize_
    check_runs_here(module, config.quant_type)
    regions = _regions(module, config)
    plan = {}
    for layer, quant_type in (config.precision_plan or {}).items():
        plan.setdefault(quant_type.lower(), []).append(layer)
    regional = regions != [module]  # cache-dit runs a precision plan in regional quantization only
    passes = [_Selection(config, t, plan[t]) for t in QUANT_TYPES if regional and t in plan]
    passes.append(_Selection(config, config.quant_type))
    for selection in passes:
        check_runs_here(module, selection.quant_type)
        ao_config = torchao_config(selection.quant_type)
        with _zero_rows_keep_scale_one(selection.quant_type):
            for region in regions:
                quantize_(region, ao_config, filter_fn=selection)
    linears = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    logger.info("cachedit: quantized %s of %d linear layers of %s (%s)", "+".join(str(s.quantized) for s in passes),
                linears, type(module).__name__, "+".join(s.quant_type for s in passes))
    module._is_quantized, module._quantize_config = True, config
    module._quantize_type, module._exclude_layers = config.quant_type, config.exclude_layers
    return module
