"""The one way from user configs to what the passes compile in: :class:`PassSettings`.

The backend, an ``enable_cache`` install (through the backend's options), export and the graph report
all build their settings with :func:`pass_settings`, so a config means the same graph on every path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .cache import DBCacheConfig
from .calibrator import CalibratorConfig, coerce_calibrator
from .choices import ChainPolicy, SeparateCFG
from .fields import structural_fields, validated
from .indicators import coerce_cache
from .prune import is_prune

if TYPE_CHECKING:
    from ..compat.forward_pattern import ForwardPattern


@dataclass(frozen=True)
class PinnedList:
    """One ModuleList of a pinned chain (what a ``BlockAdapter`` names): its path in the transformer, and
    its forward pattern when given."""

    path: str
    pattern: ForwardPattern | None = None


@dataclass(frozen=True)
class PassSettings:
    """What the passes need to know: the cache structure (Fn/Bn, calibrator, per-sample), how calls map
    to CFG branches, which chains to cache (or the one a BlockAdapter pins), and where the state lives."""

    cache_config: DBCacheConfig  # or FirstBlockCacheConfig / MagCacheConfig (config/indicators.py)
    calibrator_config: CalibratorConfig | None = None
    separate_cfg: SeparateCFG = SeparateCFG.OFF
    chains: ChainPolicy = ChainPolicy.LONGEST
    device: torch.device | None = None
    pinned: tuple[PinnedList, ...] = ()
    group: str | None = None  # the process group sharding the sequence, by name; None: found from the graph
    # DBPrune's graph form: "cond" (a torch.cond per prunable block) or "masked" (every block runs, the
    # result is selected); benchmarks/prune_forms.py measures the two, docs/architecture.md says why "cond".
    prune_form: str = "cond"
    # Pass the graph's size symbols to each cond (passes/rewrite.size_symbols): Inductor compiles a branch as
    # a function and binds symbols from its operands. AOTInductor inlines the branches, and torch.export's
    # trace may make two of them one (a duplicate branch argument), so export leaves them out.
    size_operands: bool = True


def separate_cfg_mode(value: Any, field: str = "separate_cfg", on_pipeline: bool = False) -> SeparateCFG:
    """How calls map to CFG branches. None (detect) is AUTO: two state sets, a CFG pair's second call
    told on device by its repeated timestep. On a pipeline, True is AUTO too: diffusers'
    ``cache_context`` names each call's branch, and calls of one branch may come in a row."""
    mode = SeparateCFG.parse(value, field)
    return SeparateCFG.AUTO if on_pipeline and mode is SeparateCFG.ON else mode


def pass_settings(cache_config, calibrator_config=None, separate_cfg: Any = dataclasses.MISSING,
                  chains: Any = ChainPolicy.LONGEST, pinned: tuple[PinnedList, ...] = (), group: str | None = None,
                  device: torch.device | None = None) -> PassSettings:
    """Settings from configs (objects or dicts of their fields), checked.

    Args:
        cache_config, calibrator_config: the configs; None is the default cache config / no calibrator.
        separate_cfg: overrides ``cache_config.enable_separate_cfg`` (see :func:`separate_cfg_mode`).
        chains: "longest" | "all".
        pinned: the block lists a BlockAdapter names.
        group: the process group sharding the sequence; None: found from the graph's collectives.
        device: where the state tensors live.
    """
    cache = validated(coerce_cache(cache_config) or DBCacheConfig())
    calib = validated(coerce_calibrator(calibrator_config))
    if is_prune(cache) and calib is not None:
        raise ConfigError("calibrator_config must be None with DBPruneConfig: cachedit-fx prunes by reusing each "
                          f"block's last residual and forecasts nothing per block (got {type(calib).__name__})")
    separate = cache.enable_separate_cfg if separate_cfg is dataclasses.MISSING else separate_cfg
    return PassSettings(cache, calib, separate_cfg_mode(separate), ChainPolicy.parse(chains, "chains"), device,
                        tuple(pinned), group)


def structural_changes(old_cache: DBCacheConfig, new_cache: DBCacheConfig,
                       old_calib: CalibratorConfig | None = None,
                       new_calib: CalibratorConfig | None = None) -> list[str]:
    """The fields that differ and are compiled into the graph (a change needs a new compile); another
    config class (an indicator: FirstBlockCache, MagCache) is one such change."""
    fields = dict.fromkeys([*structural_fields(old_cache), *structural_fields(new_cache)])  # configs of two classes
    changed = [f for f in fields if getattr(old_cache, f, None) != getattr(new_cache, f, None)]
    if type(old_cache) is not type(new_cache):
        changed.insert(0, f"cache_config ({type(old_cache).__name__} -> {type(new_cache).__name__})")
    if (old_calib is None) != (new_calib is None) or type(old_calib) is not type(new_calib):
        changed.append("calibrator_config")
    elif old_calib is not None:
        changed += [f for f in structural_fields(old_calib) if getattr(old_calib, f) != getattr(new_calib, f)]
    return changed


def strify(cache_config: DBCacheConfig, calibrator_config: CalibratorConfig | None = None,
           pruned_ratio: float | None = None) -> str:
    """cache-dit's tag of a cache and calibrator config pair (``T0O0`` without a calibrator); under DBPrune
    with ``pruned_ratio`` (the last request's) ``_P<percent>`` follows the cache config's part."""
    pruned = f"_P{round(pruned_ratio * 100, 2)}" if pruned_ratio is not None and is_prune(cache_config) else ""
    return f"{cache_config.strify()}{pruned}_{calibrator_config.strify() if calibrator_config is not None else 'T0O0'}"
