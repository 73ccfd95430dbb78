"""A loaded AOTInductor package of a cached transformer: called as the exported model was, with the
cache state held here and passed to the program on every call (sized to each call's shapes)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import zipfile

import torch

from ..config import CACHE_CLASSES, coerce_calibrator
from ..errors import ConfigError
from ..runtime.chain_state import ChainState
from ..runtime.handle import CacheHandle, CachedChain, CompiledGraph
from ..runtime.layout import ChainAbout, ChainLayout
from ..runtime.shapes import evaluate
from . import callspec
from .package import METADATA, archive_root


class CachedTransformer(torch.nn.Module):
    """A loaded package: called as the exported model was (positionally or by keyword), it returns what
    the model returns, and drops into a diffusers pipeline as ``pipe.transformer``."""

    def __init__(self, path: str, device=None):
        super().__init__()
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read(f"{archive_root(z)}/{METADATA}"))
        self._runner = torch._inductor.aoti_load_package(path)
        self._call = callspec.CallSpec.from_dict(meta["call"])
        self._names = self._call.input_names()
        self._shapes = meta["user_shapes"]
        self._symbols = meta["symbols"]
        self._bounds = {s: (lo, math.inf if hi is None else hi) for s, (lo, hi) in meta["bounds"].items()}
        self._state_shapes = [c["state_shapes"] for c in meta["chains"]]
        self._last_shapes = None
        cache = CACHE_CLASSES[meta.get("cache_config_type", "DBCacheConfig")](**meta["cache_config"])
        calib = coerce_calibrator(meta["calibrator_config"])
        chains = []
        for c in meta["chains"]:
            layout = ChainLayout.from_dict(c["layout"])
            chains.append(CachedChain(ChainAbout(**c["about"]), layout, ChainState(layout, cache, device=device)))
        self.handle = CacheHandle(cache, calib, [CompiledGraph(chains)])
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(meta["config"])
        self._dtype = getattr(torch, meta["dtype"].removeprefix("torch."))
        self._branch = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.handle.chains[0].state.tensors["params"].device

    @contextlib.contextmanager
    def cache_context(self, name, **kwargs):
        self._branch = {"cond": 0, "uncond": 1}.get(name)
        try:
            yield
        finally:
            self._branch = None

    def reset(self) -> None:
        self.handle.reset()

    def _fits(self, size: int, dim) -> bool:
        if isinstance(dim, int):
            return size == dim
        if "sym" not in dim:  # a size derived from other dims: the package checks it itself
            return True
        lo, hi = self._bounds[dim["sym"]]
        return lo <= size <= hi

    def _check_shapes(self, inputs) -> None:
        for name, shape, x in zip(self._names, self._shapes, inputs):
            if shape is None:
                continue
            if not (x.dim() == len(shape) and all(self._fits(size, d) for size, d in zip(x.shape, shape))):
                allowed = [d if isinstance(d, int) else f"{d.get('sym', d)} in {list(self._bounds.get(d.get('sym'), ()))}"
                           for d in shape]
                hint = ("the package is static in shape, export again for this size" if not self._symbols else
                        "export again with a dynamic_shapes range that covers it")
                raise ConfigError(f"{name}: shape {list(x.shape)} does not fit the exported shape {allowed}; {hint}")

    def _fit_state(self, inputs) -> None:
        """Size reference and ladders to this call's shapes; new shapes start them afresh (computed step)."""
        for c, templates in zip(self.handle.chains, self._state_shapes):
            changed = False
            for name, template in templates.items():
                shape = evaluate(template, self._symbols, inputs)
                current = c.state.tensors[name]
                if tuple(current.shape) != shape:
                    c.state.tensors[name] = torch.zeros(shape, dtype=current.dtype, device=current.device)
                    changed = True
            if changed:
                for name, value in (("has_ref", False), ("ladder_len", 0), ("latent_seen", False)):
                    c.state.tensors[name].fill_(value)

    def forward(self, *args, **kwargs):
        inputs = self._call.program_inputs(args, kwargs)
        shapes_now = [tuple(x.shape) for x in inputs]
        if shapes_now != self._last_shapes:  # host-side checks once per new shape, not per step
            self._check_shapes(inputs)
            self._fit_state(inputs)
            self._last_shapes = shapes_now
        for c in self.handle.chains:
            c.state.tensors["branch_hint"].fill_(-1 if self._branch is None else self._branch)
        states = [t for c in self.handle.chains for t in c.state.ordered()]
        return self._call.output(self._runner(*inputs, *states))


def load(path: str, device=None) -> CachedTransformer:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such package: {path}")
    return CachedTransformer(path, device=device)
