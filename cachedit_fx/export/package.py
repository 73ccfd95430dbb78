"""Ahead-of-time export of the cached transformer: torch.export + an AOTInductor package.

The cache state travels as *caller-owned user inputs* that the program mutates in place. AOTInductor
(torch 2.13) constant-folds reads of mutated scalar *buffers* — a step counter kept as a module buffer
reads as its packaging-time value inside the package and the decisions go silently wrong — while user
inputs mutated in place round-trip exactly. It is also the layout the compile path uses, so one
rewritten graph serves both.
"""
from __future__ import annotations

import dataclasses
import json
import zipfile

import torch
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from ..capture import islands
from ..capture.dynamo import capture
from ..config import is_prune, pass_settings
from ..errors import ExportError
from ..passes import apply
from ..runtime.ranks import chains_group
from ..runtime.shapes import symbols_of, template
from . import callspec, shapes

METADATA = "extra/cachedit_metadata.json"  # under the archive's root folder, as the pt2 reader requires


def _is_param(node) -> bool:
    return "_parameters_" in node.name or "_buffers_" in node.name


class _Program(torch.nn.Module):
    """The rewritten graph with the model's weights held as buffers, so that export embeds them and
    the package's inputs are only the call's tensors plus the cache state. Sizes a dynamic-shape
    capture takes as graph inputs are read off the tensors they come from."""

    def __init__(self, gm, example_inputs, kinds):
        super().__init__()
        self.gm = gm
        self.kinds = kinds  # per graph input: ("w", buffer name) | ("s", (input index, dim)) | ("u", None)
        for (kind, name), value in zip(kinds, example_inputs):
            if kind == "w":
                self.register_buffer(name, value, persistent=True)

    def forward(self, *args):
        it = iter(args)
        user = [next(it) if kind == "u" else None for kind, _ in self.kinds]
        full = []
        for (kind, ref), value in zip(self.kinds, user):
            if kind == "w":
                value = getattr(self, ref)
            elif kind == "s":
                value = args[ref[0]].size(ref[1])
            full.append(value)
        return self.gm(*full, *it)


def _graph_inputs(placeholders, example_inputs, call: dict):
    """How the program fills each graph input (see :class:`_Program`), and the canonical-call path of
    each tensor it takes."""
    kinds, paths = [], []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        found = None if _is_param(node) else callspec.source_path(getattr(node, "_dynamo_source", None), call)
        if found is None:
            kinds.append(("w", f"w{i}"))
            continue
        path, dim = found
        if dim is None:
            kinds.append(("u", None))
            paths.append(path)
        else:
            kinds.append(("s", path, dim))
    kinds = [(k[0], (paths.index(k[1]), k[2])) if k[0] == "s" else k for k in kinds]
    return kinds, paths


def export_program(transformer: torch.nn.Module, example_args=(), example_kwargs=None, cache_config=None,
                   calibrator_config=None, separate_cfg: bool | None = None, dynamic_shapes: dict | None = None,
                   chains: str = "longest"):
    """torch.export of the rewritten transformer. Returns (ExportedProgram, metadata for load()).

    ``transformer`` is any module whose forward holds a block chain; ``example_args`` / ``example_kwargs``
    one call of it (positional, keyword, or both). ``dynamic_shapes``: {argument name: {dim:
    torch.export.Dim | Dim.AUTO | Dim.DYNAMIC}} for the dimensions (batch, tokens) that may vary between
    calls; the others stay fixed. ``chains``: cache the longest block chain or ``"all"``.
    """
    settings = dataclasses.replace(pass_settings(cache_config, calibrator_config,
                                                 dataclasses.MISSING if separate_cfg is None else separate_cfg,
                                                 chains), size_operands=False)
    cache, calib = settings.cache_config, settings.calibrator_config
    if is_prune(cache):
        raise ExportError("export: cache_config is a DBPruneConfig; export packages DBCache (cache_type=DBCache) "
                          "only: serve DBPrune with enable_cache or torch.compile(backend='cachedit')")
    params = callspec.record_signature(transformer.forward)
    call = callspec.canonical_call(params, tuple(example_args), dict(example_kwargs or {}))
    marked, spec = shapes.mark_dynamic(call, dynamic_shapes)
    try:
        # No duck sizing: two dims the user keeps apart must not share a symbol only because the example
        # gives them equal sizes (the state's shape templates are written in these symbols).
        with fx_config.patch(use_duck_shape=not spec):
            gm, example_inputs = capture(transformer, kwargs=marked)
    except ConstraintViolationError as e:
        raise shapes.constraint_error(transformer, e) from e
    hidden = islands.needed_for_graph(transformer, gm)
    if hidden:
        raise ExportError(f"export: {type(transformer).__name__}'s blocks hold data-dependent ops (in "
                          f"{sorted({type(m).__name__ for m in hidden})}); enable_cache runs them as Python islands, "
                          "which an AOTInductor package cannot hold")
    result = apply(gm, settings)
    if not result.modified:
        raise ExportError(f"export: nothing to cache in {type(transformer).__name__}: {result.unmatched}")
    group = chains_group(result.chains)
    if group is not None:
        raise ExportError(f"export: {type(transformer).__name__} runs context-parallel collectives (process group "
                          f"{group}); an exported package runs in one process: export the transformer "
                          "without enable_parallelism (serve context-parallel with enable_cache or the backend)")
    work, rewritten = result.graph_module, result.chains
    # The rewrite appends the state placeholders after the captured ones.
    placeholders = [n for n in work.graph.nodes if n.op == "placeholder"][:len(example_inputs)]
    kinds, paths = _graph_inputs(placeholders, example_inputs, call)
    program = _Program(work, example_inputs, kinds)
    user_nodes = [n for n, (kind, _) in zip(placeholders, kinds) if kind == "u"]
    user = [x for x, (kind, _) in zip(example_inputs, kinds) if kind == "u"]
    states = [t for c in rewritten for t in c.state.ordered()]
    with torch.no_grad():  # the program's outputs against the model's, to rebuild its output from them
        out_program = program(*user, *states)
        out_model = transformer(**call)
    for c in rewritten:
        c.state.reset()
    templates = [shapes.state_templates(c) for c in rewritten]
    user_specs = [spec.get(path[0]) if len(path) == 1 else None for path in paths]
    state_templates = [t.get(name) for c, t in zip(rewritten, templates) for name in c.layout.names()]
    with torch.no_grad():
        ep = torch.export.export(program, tuple(user + states),
                                 dynamic_shapes=(shapes.export_spec(user_specs, state_templates),) if spec else None)
    user_values = [n.meta["example_value"] for n in user_nodes]
    meta = {
        "call": callspec.build(params, call, paths, out_model, out_program).to_dict(),
        "user_shapes": [template(v.shape) if isinstance(v, torch.Tensor) else None for v in user_values],
        "symbols": symbols_of(user_values),
        "bounds": shapes.bounds_of(user_values),
        "cache_config": dict(vars(cache)),
        "cache_config_type": type(cache).__name__,
        "calibrator_config": dict(vars(calib)) if calib else None,
        "chains": [{"about": dataclasses.asdict(c.about), "layout": c.layout.to_dict(), "state_shapes": t}
                   for c, t in zip(rewritten, templates)],
        "config": dict(getattr(transformer, "config", {}) or {}),
        "dtype": str(next(transformer.parameters()).dtype),
    }
    return ep, meta


def export(transformer: torch.nn.Module, example_args=(), example_kwargs=None, cache_config=None,
           calibrator_config=None, path: str = "model.pt2", separate_cfg: bool | None = None,
           inductor_configs: dict | None = None, dynamic_shapes: dict | None = None, chains: str = "longest") -> str:
    """Export ``transformer`` with the cache decision inside the program and package it for AOTInductor.

    Without ``dynamic_shapes`` the package serves calls with the example's shapes only. With it, the
    named dims may vary; the state is resized to each call's shapes and a call whose shapes differ
    from the previous call's is a computed step.
    """
    ep, meta = export_program(transformer, example_args, example_kwargs, cache_config, calibrator_config,
                              separate_cfg, dynamic_shapes, chains)
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=inductor_configs or {})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{archive_root(z)}/{METADATA}", json.dumps(meta, default=str))
    return path


def archive_root(z: zipfile.ZipFile) -> str:
    return z.namelist()[0].split("/")[0]
