"""How an exported package is called and what it returns, recorded at export as structured data.

A call is bound to the model's forward signature and laid out *canonically*: one dict by parameter
name (defaults filled in, ``**kwargs`` entries spread into it), flattened with torch's pytree. Its
tree spec and non-tensor leaves are what the program was specialised on; its tensor leaves feed the
program. The output is the model's own, rebuilt from the program's flat outputs with the output's tree
spec (a tensor, a tuple, a diffusers output class). A call of the loaded package with another structure,
constant or type raises an error naming the argument.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._dynamo.source import DictGetItemSource, GetItemSource, LocalSource, TensorProperty, TensorPropertySource

from ..errors import ConfigError, ExportError

_JSON_SCALARS = (type(None), bool, int, float, str)
_NO_DEFAULT = "<required>"


def _kind(name: str) -> inspect._ParameterKind:
    return inspect._ParameterKind[name]


def record_signature(forward) -> list[dict]:
    """The forward's parameters as JSON: name, kind, and the default when it is a plain value."""
    out = []
    for p in inspect.signature(forward).parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise ExportError(f"export: forward(*{p.name}) is not supported; give the forward named parameters")
        default = p.default if p.default is not inspect.Parameter.empty and isinstance(p.default, _JSON_SCALARS) \
            else _NO_DEFAULT
        out.append({"name": p.name, "kind": p.kind.name, "default": default})
    return out


def _signature(params: list[dict]) -> inspect.Signature:
    return inspect.Signature([
        inspect.Parameter(p["name"], _kind(p["kind"]),
                          default=inspect.Parameter.empty if p["default"] == _NO_DEFAULT else p["default"])
        for p in params])


def canonical_call(params: list[dict], args: tuple, kwargs: dict) -> dict:
    """The call as one dict by parameter name, defaults filled in, ``**kwargs`` entries spread."""
    try:
        bound = _signature(params).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"call: {e}") from None
    bound.apply_defaults()
    call: dict = {}
    for name, value in bound.arguments.items():
        if _kind(next(p["kind"] for p in params if p["name"] == name)) is inspect.Parameter.VAR_KEYWORD:
            call.update(sorted(value.items()))  # by name, whatever order the caller passed them in
        else:
            call[name] = value
    return call


def _key_of(entry) -> Any:
    return getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", None)))


def _describe(path: tuple) -> str:
    return path[0] + "".join(f"[{k!r}]" for k in path[1:])


def source_path(source, call: dict) -> tuple[tuple, int | None] | None:
    """(path of keys into the canonical call, dim) of a graph input's Dynamo source: dim is None for a
    tensor, the dimension for a size Dynamo passes as an input. None for a source that is not the call's
    (module state)."""
    dim = None
    if isinstance(source, TensorPropertySource) and source.prop is TensorProperty.SIZE:
        source, dim = source.base, source.idx
    keys = []
    while isinstance(source, (GetItemSource, DictGetItemSource)):
        keys.append(source.index)
        source = source.base
    if not isinstance(source, LocalSource):
        return None
    path = (source.local_name, *reversed(keys))
    if path[0] not in call and len(path) > 1 and path[1] in call:
        path = path[1:]  # a wrapper's (*args, **kwargs) frame, or the forward's own **kwargs
    return path, dim


@dataclass
class CallSpec:
    """The structure a package was exported for: its calls and its output."""

    params: list[dict]
    arguments: list[list]  # [name, tree spec of that argument] in the canonical call's order
    names: list[str]  # each leaf of the canonical call, as the argument it is ("attention_kwargs['scale']")
    constants: dict[str, Any]  # leaf index -> the value a non-tensor leaf had at export
    inputs: list[int]  # leaf index of each tensor the program takes, in its order
    out_spec: str
    outputs: list  # per output leaf: the program output's index, or {"constant": value}
    output_modules: list[str]  # modules that define the output's classes (imported before rebuilding it)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CallSpec":
        return cls(**d)

    def program_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensors of a call of the loaded package, in the program's order, the call checked against
        the structure, constants and types it was exported with."""
        call = canonical_call(self.params, args, kwargs)
        exported = [name for name, _ in self.arguments]
        if list(call) != exported:
            raise ConfigError(f"call: arguments {sorted(set(call) ^ set(exported))} differ from the export's "
                              f"({exported})")
        for name, spec in self.arguments:
            if pytree.treespec_dumps(pytree.tree_structure(call[name])) != spec:
                raise ConfigError(f"{name}: its structure differs from the export's (another container or dict "
                                  "keys); export again for it")
        leaves = pytree.tree_leaves(call)
        for index, leaf in enumerate(leaves):
            name = self.names[index]
            if str(index) in self.constants:
                want = self.constants[str(index)]
                if isinstance(leaf, torch.Tensor) or leaf != want:
                    raise ConfigError(f"{name}: exported with {want!r}, called with "
                                      f"{'a tensor' if isinstance(leaf, torch.Tensor) else repr(leaf)}; export "
                                      "again for this value")
            elif not isinstance(leaf, torch.Tensor):
                raise ConfigError(f"{name}: exported as a tensor, called with {type(leaf).__name__}")
        return [leaves[i] for i in self.inputs]

    def input_names(self) -> list[str]:
        return [self.names[i] for i in self.inputs]

    def output(self, flat) -> Any:
        """The model's own output from the program's flat outputs."""
        for module in self.output_modules:
            importlib.import_module(module)
        flat = list(flat) if isinstance(flat, (list, tuple)) else [flat]
        leaves = [o["constant"] if isinstance(o, dict) else flat[o] for o in self.outputs]
        return pytree.tree_unflatten(leaves, pytree.treespec_loads(self.out_spec))


def _output_modules(spec: pytree.TreeSpec) -> list[str]:
    found, todo = set(), [spec]
    while todo:
        s = todo.pop()
        if s.type is not None and s.type.__module__ != "builtins":
            found.add(s.type.__module__)
        todo.extend(s.children())
    return sorted(found)


def build(params: list[dict], call: dict, graph_inputs: list, output, graph_outputs) -> CallSpec:
    """The spec of an export: ``graph_inputs`` are the paths (from :func:`source_path`) of the tensors
    the program takes; ``output`` is the model's output for the example call and ``graph_outputs`` the
    program's flat outputs for it, matched leaf by leaf."""
    paths_leaves, _ = pytree.tree_flatten_with_path(call)
    paths = [tuple(_key_of(k) for k in path) for path, _ in paths_leaves]
    leaves = [leaf for _, leaf in paths_leaves]
    constants = {}
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            if not isinstance(leaf, _JSON_SCALARS):
                raise ExportError(f"export: argument {_describe(paths[i])} is a {type(leaf).__name__}; a package takes "
                                  "tensors and plain values (None, bool, int, float, str)")
            constants[str(i)] = leaf
    try:
        inputs = [paths.index(path) for path in graph_inputs]
    except ValueError:
        raise ExportError(f"export: the graph reads an input the call does not pass by name: {graph_inputs}") from None
    out_leaves, out_spec = pytree.tree_flatten(output)
    flat = list(graph_outputs) if isinstance(graph_outputs, (list, tuple)) else [graph_outputs]
    used: set[int] = set()
    outputs: list = []
    for leaf in out_leaves:
        if not isinstance(leaf, torch.Tensor):
            outputs.append({"constant": leaf})
            continue
        same = [j for j, o in enumerate(flat) if isinstance(o, torch.Tensor) and o.shape == leaf.shape]
        match = [j for j in same if torch.equal(flat[j], leaf)] or \
            [j for j in same if torch.allclose(flat[j], leaf, rtol=1e-4, atol=1e-5)]
        match = [j for j in match if j not in used] or match
        if not match:
            raise ExportError("export: an output of the model is not an output of its graph")
        used.add(match[0])
        outputs.append(match[0])
    arguments = [[name, pytree.treespec_dumps(pytree.tree_structure(value))] for name, value in call.items()]
    return CallSpec(params, arguments, [_describe(p) for p in paths], constants, inputs,
                    pytree.treespec_dumps(out_spec), outputs, _output_modules(out_spec))
