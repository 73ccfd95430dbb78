"""The ``cachedit`` backend's options, checked once: a dict in, :class:`BackendOptions` out.

Options: ``cache_config`` and ``calibrator_config`` (objects or dicts), ``inner`` (inductor | aot_eager |
eager | tensorrt | a callable), ``inner_options`` (passed to the inner compiler), ``background_compile``
(True: Inductor compiles in a child process while calls run the graph eagerly, see backend/background.py;
inner="inductor" only), ``separate_cfg`` (True /
"on": two state sets, calls alternate; "auto" or None: two state sets, a call whose timestep repeats the
previous call's is the second of a CFG pair, told on device; False / "off": one; default from
cache_config.enable_separate_cfg), ``chains`` ("longest" | "all"), ``blocks`` (the ModuleList paths of the
one chain to cache, e.g. ``["transformer_blocks", "single_transformer_blocks"]``, or
:class:`~cachedit_fx.config.PinnedList` entries with a pattern: what a ``BlockAdapter`` pins; checked
against the graph), ``handle`` (a :class:`~cachedit_fx.runtime.handle.CacheHandle` that collects the state
and owns the configs; configs given beside it must agree on the structural fields; enable_cache passes one), ``process_group``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..config import (PassSettings, PinnedList, coerce_cache, coerce_calibrator, pass_settings,
                      structural_changes)
from ..errors import ConfigError
from ..runtime.handle import CacheHandle
from .inner import check_inner

OPTION_KEYS = ("cache_config", "calibrator_config", "inner", "separate_cfg", "chains", "blocks", "handle",
               "inner_options", "process_group", "background_compile")


@dataclass(frozen=True)
class BackendOptions:
    """The backend's options, checked; ``handle`` owns the cache and calibrator configs."""

    handle: CacheHandle
    settings: PassSettings  # without the device, known only when a graph arrives
    inner: Any
    inner_options: dict
    background_compile: bool = False

    def pass_settings(self, device=None) -> PassSettings:
        return dataclasses.replace(self.settings, device=device)


def _pinned(blocks) -> tuple[PinnedList, ...]:
    blocks = [blocks] if isinstance(blocks, (str, PinnedList)) else list(blocks or ())
    if not all(isinstance(b, (str, PinnedList)) for b in blocks):
        raise ConfigError(f"blocks must be ModuleList paths (str) or PinnedList entries, got {blocks!r}")
    return tuple(b if isinstance(b, PinnedList) else PinnedList(b) for b in blocks)


def _group_name(group) -> str | None:
    """A process group (or its name) the sequence is sharded over; None: found from the graph."""
    if group is None or isinstance(group, str):
        return group
    name = getattr(group, "group_name", None)
    if not isinstance(name, str):
        raise ConfigError(f"process_group must be a torch.distributed ProcessGroup or its name, got {group!r}")
    return name


def _check_agrees(handle: CacheHandle, cache, calib) -> None:
    """A handle owns its configs (``configure`` may have changed its numbers since): configs given beside
    it must agree on what is compiled into the graph."""
    given_cache = coerce_cache(cache) or handle.cache_config
    given_calib = coerce_calibrator(calib) if calib is not None else handle.calibrator_config
    changed = structural_changes(handle.cache_config, given_cache, handle.calibrator_config, given_calib)
    if changed:
        raise ConfigError(f"cachedit backend: the options' {', '.join(changed)} disagree with the handle's, which "
                          "owns the configs; give one of them")


def parse_options(options: dict | None) -> BackendOptions:
    """Check ``options`` (see the module docstring).

    Raises:
        ConfigError: an unknown option, a value outside what it accepts, or configs whose structural
            fields disagree with ``handle``'s.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"cachedit backend: unknown option(s) {unknown}; allowed: {list(OPTION_KEYS)}")
    handle = options.get("handle")
    cache, calib = options.get("cache_config"), options.get("calibrator_config")
    if handle is not None:
        _check_agrees(handle, cache, calib)
        cache, calib = handle.cache_config, handle.calibrator_config
    separate = options["separate_cfg"] if "separate_cfg" in options else dataclasses.MISSING
    settings = pass_settings(cache, calib, separate, options.get("chains", "longest"), _pinned(options.get("blocks")),
                             _group_name(options.get("process_group")))
    inner = options.get("inner", "inductor")
    check_inner(inner)
    background = options.get("background_compile", False)
    if background not in (True, False):
        raise ConfigError(f"cachedit backend: background_compile must be True or False, got {background!r}")
    if background and inner != "inductor":
        raise ConfigError(f"cachedit backend: background_compile=True needs inner='inductor' (the compile that runs in "
                          f"a child process), got inner={inner!r}")
    if handle is None:
        handle = CacheHandle(settings.cache_config, settings.calibrator_config)
    return BackendOptions(handle, settings, inner, options.get("inner_options") or {}, bool(background))
