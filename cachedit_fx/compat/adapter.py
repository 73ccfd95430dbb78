"""``BlockAdapter``: cache-dit's way to name a model's blocks by hand, accepted by ``enable_cache``.

cachedit-fx finds the blocks from the graph, so an adapter is never needed; given one, its block lists
pin the chain each transformer caches (checked against the graph: passes/pin.py). The fields are
cache-dit's; a ``patch_functor`` is applied when the adapter is made (the graph is then the patched
forward's); dummy blocks, which the graph makes unnecessary, are refused by name instead of ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PinnedList
from ..errors import ConfigError
from .forward_pattern import ForwardPattern


def _per_transformer(value, n: int, what: str) -> list:
    """cache-dit nests per transformer, then per block list: normalise to [[...] per transformer]."""
    if value is None:
        return [None] * n
    if not isinstance(value, (list, tuple)):
        value = [value]
    if n == 1 and not (value and isinstance(value[0], (list, tuple))):
        return [list(value)]
    if len(value) != n or not all(isinstance(v, (list, tuple)) for v in value):
        raise ConfigError(f"BlockAdapter.{what}: expected one list per transformer ({n}), got {value!r}")
    return [list(v) for v in value]


@dataclass
class BlockAdapter:
    """The blocks (ModuleLists) of a pipeline's transformer(s), and optionally their forward patterns."""

    pipe: Any = None
    transformer: torch.nn.Module | list[torch.nn.Module] | None = None
    blocks: Any = None  # a ModuleList, a list of them, or one list per transformer
    blocks_name: Any = None  # their attribute names, nested the same way
    unique_blocks_name: Any = field(default_factory=list)
    dummy_blocks_names: Any = field(default_factory=list)
    forward_pattern: Any = None  # a ForwardPattern, or one per block list
    params_modifiers: Any = None
    check_forward_pattern: bool | None = None
    check_num_outputs: bool = False
    patch_functor: Any = None
    has_separate_cfg: bool = False
    auto: bool = False
    allow_prefixes: list[str] = field(default_factory=lambda: ["transformer", "single_transformer", "blocks",
                                                               "layers", "single_stream_blocks",
                                                               "double_stream_blocks"])
    check_prefixes: bool = True
    allow_suffixes: list[str] = field(default_factory=lambda: ["TransformerBlock"])
    check_suffixes: bool = False
    blocks_policy: str = "max"
    skip_post_init: bool = False

    def __post_init__(self) -> None:
        if self.patch_functor is not None and not callable(getattr(self.patch_functor, "apply", None)):
            raise ConfigError(f"BlockAdapter.patch_functor must be a PatchFunctor (with apply(transformer)), got "
                              f"{type(self.patch_functor).__name__}")
        if self.patch_functor is not None and not self.skip_post_init and \
                (self.pipe is not None or self.transformer is not None):
            for transformer in self.transformers():  # cache-dit patches when the adapter is made
                self.patch_functor.apply(transformer)
        if self.dummy_blocks_names:
            raise ConfigError("BlockAdapter.dummy_blocks_names: not supported; name only the block lists to cache")
        if self.blocks_policy not in ("max", "min"):
            raise ConfigError(f"BlockAdapter.blocks_policy must be 'max' or 'min', got {self.blocks_policy!r}")

    def transformers(self) -> list[torch.nn.Module]:
        found = self.transformer if self.transformer is not None else getattr(self.pipe, "transformer", None)
        found = list(found) if isinstance(found, (list, tuple)) else [found]
        if not found or not all(isinstance(t, torch.nn.Module) for t in found):
            raise ConfigError("BlockAdapter: give transformer= (a module or a list of them) or a pipe= with a "
                              "transformer")
        return found

    def pins(self) -> list[tuple[PinnedList, ...]]:
        """Per transformer, the block lists it pins (empty: the graph picks, as without an adapter)."""
        transformers = self.transformers()
        n = len(transformers)
        blocks = _per_transformer(self.blocks, n, "blocks")
        names = _per_transformer(self.blocks_name, n, "blocks_name")
        patterns = _per_transformer(self.forward_pattern, n, "forward_pattern")
        out = []
        for t, bl, nm, pt in zip(transformers, blocks, names, patterns):
            paths = self._paths(t, bl, nm)
            if pt is not None and len(pt) != len(paths):
                if len(pt) != 1:
                    raise ConfigError(f"BlockAdapter.forward_pattern: {len(pt)} patterns for {len(paths)} block lists")
                pt = pt * len(paths)
            for p in pt or ():
                if not isinstance(p, ForwardPattern):
                    raise ConfigError(f"BlockAdapter.forward_pattern must hold ForwardPattern members "
                                      f"(Pattern_0 ... Pattern_5), got {p!r}")
            out.append(tuple(PinnedList(path, pt[i] if pt else None) for i, path in enumerate(paths)))
        return out

    def _paths(self, transformer: torch.nn.Module, blocks, names) -> list[str]:
        if self.auto:
            return []
        where = {id(m): name for name, m in transformer.named_modules()}
        paths = []
        for lst in blocks or ():
            if not isinstance(lst, torch.nn.ModuleList) or id(lst) not in where:
                raise ConfigError(f"BlockAdapter.blocks: every entry must be a ModuleList inside "
                                  f"{type(transformer).__name__}, got {type(lst).__name__}")
            paths.append(where[id(lst)])
        for i, name in enumerate(names or ()):
            found = dict(transformer.named_modules()).get(name)
            if not isinstance(found, torch.nn.ModuleList):
                raise ConfigError(f"BlockAdapter.blocks_name: {type(transformer).__name__} has no ModuleList "
                                  f"{name!r}")
            if i < len(paths) and paths[i] != name:
                raise ConfigError(f"BlockAdapter: blocks[{i}] is {paths[i]!r} but blocks_name[{i}] is {name!r}")
            if i >= len(paths):
                paths.append(name)
        return paths
