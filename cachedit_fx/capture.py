"""Capture a transformer's forward as the FX graph the ``cachedit`` backend sees (Dynamo)."""
from __future__ import annotations

import re

import torch

_DICT_MODULES = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]")
_KEY = re.compile(r"\['([^']+)'\]")
_INDEX = re.compile(r"\[(\d+)\]")


def normalize_qualname(name: str) -> str:
    """``L['self'].__dict__['_modules']['transformer_blocks'].0`` -> ``transformer_blocks.0``."""
    name = _DICT_MODULES.sub(r".\1", name)
    name = re.sub(r"^(L\['[^']+'\]|self|L__self__)", "", name)
    name = _KEY.sub(r".\1", name)
    name = _INDEX.sub(r".\1", name)
    name = name.replace("._modules.", ".")
    return name.strip(".")


def module_path(node: torch.fx.Node) -> list[tuple[str, type | None]]:
    """The node's module stack, outermost first, as (normalised path, class)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = (value[0], value[1]) if isinstance(value, tuple) else (value, None)
        out.append((normalize_qualname(path), cls if isinstance(cls, type) else None))
    return out


def concrete_shape(value) -> tuple[int, ...] | None:
    """A tensor's shape with symbolic sizes (a capture with dynamic dims) read as their example values.
    Passes decide on these; comparing the symbolic sizes themselves would add guards that specialise
    the dims back to constants."""
    if not isinstance(value, torch.Tensor):
        return None
    if any(not isinstance(d, int) and d.node.hint is None for d in value.shape):
        return None  # a data-dependent size has no example value: an unknown shape, like a non-tensor's
    return tuple(d if isinstance(d, int) else int(d.node.hint) for d in value.shape)


class CaptureError(RuntimeError):
    """The forward cannot be captured as ONE Dynamo graph (data-dependent control flow, an op Dynamo
    cannot trace). The passes rewrite one whole graph; enable_cache makes submodules that break it inside
    every block opaque islands (islands.py), which export and the bare backend cannot do."""


def _user_frame(message: str) -> str:
    """The innermost user-code location Dynamo reports (``file:line in fn`` and the line itself)."""
    tail = message.split("from user code:")[-1]
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', tail)
    frames = [f for f in frames if "/torch/" not in f[0]] or frames
    if not frames:
        return ""
    path, line, fn, code = frames[-1]
    return f" at {path.rsplit('/', 1)[-1]}:{line} in {fn}: `{code.strip()}`"


def _capture_once(module, args, kwargs):
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(module, backend=record, fullgraph=True, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return graphs[0]


def capture(module: torch.nn.Module, args=(), kwargs=None) -> tuple[torch.fx.GraphModule, list]:
    """Run Dynamo over ``module(*args, **kwargs)`` and return the (single) graph and example inputs.

    An ``Unsupported`` construct may sit on a path a model takes only on its first call (Z-Image builds
    its RoPE table lazily under ``with torch.device(...)``, which Dynamo cannot enter): the module is
    then run once eagerly and traced again. A forward that still does not fit one graph — or that
    fails on data-dependent values (Lumina2's mask lengths, HiDream's MoE routing), which no rerun
    fixes — raises :class:`CaptureError` naming the model and the line that breaks it.
    """
    kwargs = kwargs or {}
    try:
        return _capture_once(module, args, kwargs)
    except torch._dynamo.exc.Unsupported:
        with torch.no_grad():
            module(*args, **kwargs)
        try:
            return _capture_once(module, args, kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            raise _capture_error(module, e) from e
    except torch._dynamo.exc.TorchDynamoException as e:  # data-dependent (UserError): a rerun cannot help
        raise _capture_error(module, e) from e


def _capture_error(module: torch.nn.Module, e: Exception) -> CaptureError:
    message = str(e)
    first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
    return CaptureError(
        f"{type(module).__name__}.forward cannot be captured as one graph ({type(e).__name__}: {first})"
        f"{_user_frame(message)}. The cachedit pass needs the whole forward in one graph; this model "
        "is not cacheable as it is (enable_cache makes submodules that break every block opaque islands; an "
        "exported package cannot hold them).")


def clone_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a Dynamo graph that passes may edit, keeping what AOTAutograd reads from Dynamo
    graphs (``meta``, parameter sources, each placeholder's ``_dynamo_source``)."""
    graph = torch.fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    new = torch.fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, node in val_map.items():
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    return new
