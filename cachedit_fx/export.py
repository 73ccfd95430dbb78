"""Ahead-of-time export of the cached transformer: torch.export + an AOTInductor package.

The cache state travels as *caller-owned user inputs* that the program mutates in place. AOTInductor
(torch 2.13) constant-folds reads of mutated scalar *buffers* — a step counter kept as a module buffer
reads as its packaging-time value inside the package and the decisions go silently wrong — while user
inputs mutated in place round-trip exactly. It is also the layout the compile path uses, so one
rewritten graph serves both.
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .backend import CacheHandle, CompiledGraph
from .capture import capture, clone_graph_module
from .config import DBCacheConfig, TaylorSeerCalibratorConfig, coerce
from .passes.patterns import Unmatched, analyze
from .passes.rewrite import rewrite
from .state import ChainLayout, ChainState, StreamSpec

METADATA = "extra/cachedit_metadata.json"  # under the archive's root folder, as the pt2 reader requires


def _is_param(node) -> bool:
    return "_parameters_" in node.name or "_buffers_" in node.name


class _Program(torch.nn.Module):
    """The rewritten graph with the model's weights held as buffers, so that export embeds them and
    the package's inputs are only the call's tensors plus the cache state."""

    def __init__(self, gm, example_inputs, n_user_slots):
        super().__init__()
        self.gm = gm
        self.kinds = []
        for i, (node, value) in enumerate(zip(n_user_slots, example_inputs)):
            if _is_param(node):
                self.register_buffer(f"w{i}", value, persistent=True)
                self.kinds.append(("w", f"w{i}"))
            else:
                self.kinds.append(("u", None))

    def forward(self, *args):
        it = iter(args)
        full = [getattr(self, name) if kind == "w" else next(it) for kind, name in self.kinds]
        return self.gm(*full, *it)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _layout_json(layout: ChainLayout) -> dict:
    return {"n_branches": layout.n_branches, "slots": layout.slots, "fn_shape": list(layout.fn_shape),
            "fn_dtype": str(layout.fn_dtype), "diff_shared": layout.diff_shared, "capacity": layout.capacity,
            "streams": [{"shape": list(s.shape), "dtype": str(s.dtype), "ladder": s.ladder} for s in layout.streams]}


def _layout_from(d: dict) -> ChainLayout:
    return ChainLayout(d["n_branches"], d["slots"], tuple(d["fn_shape"]), _dtype(d["fn_dtype"]),
                       tuple(StreamSpec(tuple(s["shape"]), _dtype(s["dtype"]), s["ladder"]) for s in d["streams"]),
                       d["diff_shared"], d["capacity"])


def export_program(transformer: torch.nn.Module, example_args=(), example_kwargs=None, cache_config=None,
                   calibrator_config=None, separate_cfg: bool | None = None):
    """torch.export of the rewritten transformer. Returns (ExportedProgram, metadata for load())."""
    cache = coerce(cache_config, DBCacheConfig, "cache_config") or DBCacheConfig()
    calib = coerce(calibrator_config, TaylorSeerCalibratorConfig, "calibrator_config")
    separate = cache.enable_separate_cfg if separate_cfg is None else separate_cfg
    gm, example_inputs = capture(transformer, tuple(example_args), dict(example_kwargs or {}))
    found = analyze(gm)
    if isinstance(found, Unmatched):
        raise ValueError(f"export: nothing to cache in {type(transformer).__name__}: {found.reason}")
    work = clone_graph_module(gm)
    placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
    sources = [None if _is_param(n) else n._dynamo_source.name for n in placeholders]
    chains = rewrite(work, analyze(work)[:1], cache, calib, 2 if separate else 1)
    program = _Program(work, example_inputs, placeholders)
    user = [x for n, x in zip(placeholders, example_inputs) if not _is_param(n)]
    states = [t for c in chains for t in c.state.ordered()]
    with torch.no_grad():
        ep = torch.export.export(program, tuple(user + states))
    meta = {
        "user_sources": [s for s in sources if s is not None],
        "user_shapes": [list(x.shape) if isinstance(x, torch.Tensor) else None for x in user],
        "cache_config": dict(vars(cache)),
        "calibrator_config": dict(vars(calib)) if calib else None,
        "chains": [{"name": c.info.name, "pattern": c.info.pattern, "n_blocks": c.info.n_blocks, "fn": c.split.fn,
                    "bn": c.split.bn, "layout": _layout_json(c.layout)} for c in chains],
        "config": dict(getattr(transformer, "config", {}) or {}),
        "dtype": str(next(transformer.parameters()).dtype),
    }
    return ep, meta


def export(transformer: torch.nn.Module, example_args=(), example_kwargs=None, cache_config=None,
           calibrator_config=None, path: str = "model.pt2", separate_cfg: bool | None = None,
           inductor_configs: dict | None = None) -> str:
    """Export ``transformer`` with the cache decision inside the program and package it for AOTInductor.

    The package is static in shape: it serves calls with the example's shapes (export again per
    resolution / batch size).
    """
    ep, meta = export_program(transformer, example_args, example_kwargs, cache_config, calibrator_config,
                              separate_cfg)
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=inductor_configs or {})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{_archive_root(z)}/{METADATA}", json.dumps(meta, default=str))
    return path


def _archive_root(z: zipfile.ZipFile) -> str:
    return z.namelist()[0].split("/")[0]


@dataclass(eq=False)
class _ExportedChain:
    info: SimpleNamespace
    split: SimpleNamespace
    layout: ChainLayout
    state: ChainState


class CachedTransformer(torch.nn.Module):
    """A loaded package that drops into a diffusers pipeline as ``pipe.transformer``."""

    def __init__(self, path: str, device=None):
        super().__init__()
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read(f"{_archive_root(z)}/{METADATA}"))
        self._runner = torch._inductor.aoti_load_package(path)
        self._sources = meta["user_sources"]
        self._shapes = meta["user_shapes"]
        cache = DBCacheConfig(**meta["cache_config"])
        calib = TaylorSeerCalibratorConfig(**meta["calibrator_config"]) if meta["calibrator_config"] else None
        chains = []
        for c in meta["chains"]:
            layout = _layout_from(c["layout"])
            chains.append(_ExportedChain(SimpleNamespace(name=c["name"], pattern=c["pattern"], n_blocks=c["n_blocks"]),
                                         SimpleNamespace(fn=c["fn"], bn=c["bn"]), layout,
                                         ChainState(layout, cache, device=device)))
        self.handle = CacheHandle(cache, calib, [CompiledGraph(chains, frozenset())])
        self._cachedit = SimpleNamespace(handle=self.handle)
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(meta["config"])
        self._dtype = _dtype(meta["dtype"])
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

    def forward(self, *args, **kwargs):
        scope = {"L": {"self": None, "args": args, "kwargs": kwargs}}
        inputs = [eval(src, scope) for src in self._sources]  # noqa: S307 - our own Dynamo source names
        for src, shape, x in zip(self._sources, self._shapes, inputs):
            if isinstance(x, torch.Tensor) and shape is not None and list(x.shape) != shape:
                raise ValueError(f"{src}: shape {list(x.shape)} differs from the exported {shape}; the package is "
                                 "static in shape, export again for this size")
        for c in self.handle.chains:
            c.state.tensors["branch_hint"].fill_(-1 if self._branch is None else self._branch)
        states = [t for c in self.handle.chains for t in c.state.ordered()]
        out = self._runner(*inputs, *states)
        sample = out[0] if isinstance(out, (list, tuple)) else out
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)


def load(path: str, device=None) -> CachedTransformer:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such package: {path}")
    return CachedTransformer(path, device=device)
