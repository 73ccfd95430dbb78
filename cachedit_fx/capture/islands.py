"""Islands: submodules of the repeated blocks that Dynamo cannot trace, made opaque so the whole
transformer forward still fits one graph (and can be cached).

A module that syncs with the host or has data-dependent shapes (a MoE's ``bincount().cpu()`` routing
loop, an attention that drops padded tokens with ``torch.nonzero``) breaks Dynamo's graph in every
block, and a graph that never holds two consecutive blocks cannot be cached. Such a module is found
from one capture of the forward — the user frames of the exception that stopped it, or the module
stack of a node whose output shape depends on data — and every instance of its class inside the
block lists is replaced by a call to the custom op ``cachedit::island``. The op runs the module's
original forward, so its host sync still happens on computed steps; a cached step skips the middle
blocks and with them their islands. Inference-only, like the rest of the cache.
"""
from __future__ import annotations

import inspect
import itertools
import re
import weakref

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import IslandsNeeded
from .dynamo import trace
from .fx_facts import ATTENTION_OPS, normalize_qualname

_RECORDS: "weakref.WeakValueDictionary[int, _Island]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


class _Island:
    """Host-side record of one island instance: its original forward, the call structures seen (the
    op carries only tensors) and the output metadata per input signature."""

    def __init__(self, module: torch.nn.Module):
        self.id = next(_IDS)
        self.module_ref = weakref.ref(module)
        self.had_forward = "forward" in module.__dict__
        self.original = module.forward  # a hook that patched the instance's forward stays in the chain
        self.calls: list[tuple] = []  # (input spec, per leaf: None for a tensor, (value,) otherwise)
        self.out_spec = self.out_consts = None  # one output structure per island, checked on every run
        self.outputs: dict[tuple, list[tuple]] = {}
        self.seen_ops = False
        _RECORDS[self.id] = self

    def intern(self, spec, consts) -> int:
        for i, (s, c) in enumerate(self.calls):
            if s == spec and c == consts:
                return i
        self.calls.append((spec, consts))
        return len(self.calls) - 1

    def run(self, call_id: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        spec, consts = self.calls[call_id]
        it = iter(tensors)
        args, kwargs = pytree.tree_unflatten([next(it) if c is None else c[0] for c in consts], spec)
        if self.seen_ops:
            with torch.no_grad():
                out = self.original(*args, **kwargs)
        else:  # the first run: which ops it hides, for the node's name
            with torch.no_grad(), _Ops() as ops:
                out = self.original(*args, **kwargs)
            _name_caller(type(self.module_ref()), ops.names)
            self.seen_ops = True
        leaves, out_spec = pytree.tree_flatten(out)
        out_consts = tuple(None if isinstance(x, torch.Tensor) else (x,) for x in leaves)
        if self.out_spec is None:
            self.out_spec, self.out_consts = out_spec, out_consts
        elif (out_spec, out_consts) != (self.out_spec, self.out_consts):
            raise RuntimeError(f"cachedit island {type(self.module_ref()).__name__}: its output structure "
                               f"changed between calls ({self.out_spec} vs {out_spec})")
        # A custom op may return neither views of its inputs nor two views of one buffer: copy those.
        seen = {t.untyped_storage().data_ptr() for t in tensors}
        fresh = []
        for x in (x for x in leaves if isinstance(x, torch.Tensor)):
            ptr = x.untyped_storage().data_ptr()
            x = x.clone(memory_format=torch.contiguous_format) if ptr in seen or not x.is_contiguous() else x
            seen.add(x.untyped_storage().data_ptr())
            fresh.append(x)
        self._check_meta(call_id, tensors, fresh)
        return fresh

    def rebuild(self, flat):
        """The module's output from the op's tensors (traced by Dynamo: the spec is a constant)."""
        it = iter(flat)
        return pytree.tree_unflatten([next(it) if c is None else c[0] for c in self.out_consts], self.out_spec)

    def _check_meta(self, call_id, tensors, outs):
        key = (call_id, _signature(tensors))
        meta = [(tuple(o.shape), o.dtype, o.device) for o in outs]
        if self.outputs.setdefault(key, meta) != meta:
            raise RuntimeError(f"cachedit island {type(self.module_ref()).__name__}: output shapes depend on "
                               f"the input values ({self.outputs[key]} vs {meta}); it cannot be an island")

    def fake(self, call_id: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        key = (call_id, _signature(tensors))
        if key not in self.outputs:
            # The shapes come from one real run on stand-in values; run() checks every later real run
            # against them. Zeros first; ones where zeros make the module fail (e.g. an all-false mask).
            errors = []
            for fill in (0, 1):
                with _disable_current_modes():
                    real = [torch.full(t.shape, fill, dtype=t.dtype, device=t.device) for t in tensors]
                    try:
                        self.run(call_id, real)
                        break
                    except Exception as e:  # noqa: BLE001 - retried, then reported
                        errors.append(e)
            else:
                raise RuntimeError(f"cachedit island {type(self.module_ref()).__name__}: cannot infer output "
                                   f"shapes: {errors[-1]}") from errors[-1]
        return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in self.outputs[key]]


def _signature(tensors) -> tuple:
    for t in tensors:
        if any(isinstance(s, torch.SymInt) for s in t.shape):
            raise RuntimeError("cachedit islands need static shapes (compile with dynamic=False)")
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


@torch.library.custom_op("cachedit::island", mutates_args=())
def island_op(island_id: int, call_id: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return _RECORDS[island_id].run(call_id, inputs)


@island_op.register_fake
def _(island_id, call_id, inputs):
    return _RECORDS[island_id].fake(call_id, inputs)


class _Ops(TorchFunctionMode):
    """The names of the torch functions an island calls."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


_CALLERS: dict[type, object] = {}


def _caller(cls: type):
    """The function an island of ``cls`` is called through; one graph node per call."""
    if cls not in _CALLERS:
        def call(island_id: int, args: tuple, kwargs: dict):
            return island_call(island_id, args, kwargs)

        call.__name__ = call.__qualname__ = f"island_{cls.__name__}"
        _CALLERS[cls] = torch._dynamo.allow_in_graph(call)
    return _CALLERS[cls]


def _name_caller(cls: type, names: set[str]) -> None:
    """The block finder (passes/blocks.py) recognises attention blocks by the op names of their nodes;
    an island node hides its ops, so its caller's name lists the attention ops it ran."""
    hidden = sorted({a for a in ATTENTION_OPS if any(a in n for n in names)})
    if hidden:
        caller = _caller(cls)
        caller.__qualname__ = f"island_{cls.__name__}[{','.join(hidden)}]"


def island_call(island_id: int, args: tuple, kwargs: dict):
    """One island call, the module's output tensors flat. Dynamo writes it into the graph as one node
    (through :func:`_caller`) instead of tracing it, so the flattening below runs as plain Python (on
    fake tensors while tracing, on real ones in eager graphs): the call structure never has to become a
    graph constant."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    rec = _RECORDS[island_id]
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    consts = tuple(None if isinstance(x, torch.Tensor) else (x,) for x in leaves)
    return tuple(island_op(island_id, rec.intern(spec, consts), tensors))


# --- finding islands ------------------------------------------------------------------------------

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _frames(e: Exception) -> list[tuple[str, int, str]]:
    """The user frames of a Dynamo exception, outermost first."""
    stack = getattr(e, "real_stack", None)
    if stack:
        return [(f.filename, f.lineno, f.name) for f in stack]
    return [(p, int(n), fn) for p, n, fn in _FRAME.findall(str(e))]


def _forward_code(cls):
    fn = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    last = max((line for *_, line in code.co_lines() if line), default=code.co_firstlineno)
    return code.co_filename, code.co_name, code.co_firstlineno, last


def _classes_on_stack(frames, classes) -> set[type]:
    """The classes whose ``forward`` is the innermost module forward on the stack."""
    codes = {cls: _forward_code(cls) for cls in classes}
    for path, line, name in reversed(frames):
        hit = {cls for cls, c in codes.items() if c and c[0] == path and c[1] == name and c[2] <= line <= c[3]}
        if hit:
            return hit
    return set()


def _classes_of_data_dependent_nodes(gm, modules: dict) -> set[type]:
    """The innermost modules of the graph nodes whose output shapes or values depend on data."""
    found = set()
    graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]  # region bodies too
    for node in (n for g in graphs for n in g.nodes):
        value = node.meta.get("example_value")
        if value is None or not any(free_unbacked_symbols(v) for v in pytree.tree_leaves(value)
                                    if isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool))):
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if stack:
            module = modules.get(normalize_qualname(stack[-1][0]))
            if module is not None:
                found.add(type(module))
    return found


def _inside_blocks(name: str, modules: dict) -> bool:
    """``name`` lies strictly inside an entry of a ModuleList of >= 2 entries (a block, never the block)."""
    parts = name.split(".")
    for i in range(len(parts) - 2):
        parent = modules.get(".".join(parts[:i + 1]))
        if isinstance(parent, torch.nn.ModuleList) and len(parent) >= 2 and parts[i + 1].isdigit():
            return True
    return False


def _candidates(module: torch.nn.Module, found: set[type]) -> list[torch.nn.Module]:
    modules = dict(module.named_modules())
    return [m for name, m in modules.items() if type(m) in found and _inside_blocks(name, modules)
            and getattr(m, "_cachedit_island", None) is None]


def needed_for_graph(module: torch.nn.Module, gm) -> list[torch.nn.Module]:
    """The submodules of ``module``'s blocks whose nodes in ``gm`` depend on data (not yet islands)."""
    return _candidates(module, _classes_of_data_dependent_nodes(gm, dict(module.named_modules())))


def needed_for_error(module: torch.nn.Module, error: BaseException) -> list[torch.nn.Module]:
    """The submodules of ``module``'s blocks that an exception from a full-graph compile points at:
    those a backend reported (:class:`IslandsNeeded`), or the innermost module forward on the stack of
    a graph break."""
    chain = error
    while chain is not None:
        if isinstance(chain, IslandsNeeded):
            return _candidates(module, chain.classes)
        chain = getattr(chain, "inner_exception", None) or chain.__cause__
    classes = {type(m) for m in module.modules()}
    return _candidates(module, _classes_on_stack(_frames(error), classes))


def breaking_block_list(module: torch.nn.Module, error: BaseException) -> str | None:
    """The path of the ModuleList whose blocks' own forward breaks a full-graph compile (the innermost
    module forward on the break's stack is a block's): islands cannot isolate a block from itself."""
    lists = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 2}
    block_classes = {type(m[0]) for m in lists.values()}
    on_stack = _classes_on_stack(_frames(error), {type(m) for m in module.modules()})
    if not on_stack or not on_stack <= block_classes:
        return None
    return next(name for name, m in lists.items() if type(m[0]) in on_stack)


def find(module: torch.nn.Module, forward, args, kwargs, max_rounds: int = 8) -> list[torch.nn.Module]:
    """Find and install the islands ``forward(*args, **kwargs)`` (``module``'s forward) needs to trace as
    one graph; returns the island modules (installed; :func:`uninstall` restores them)."""
    islands: list[torch.nn.Module] = []
    for _ in range(max_rounds):
        result = trace(forward, args, kwargs)
        if result.graphs:
            new = needed_for_graph(module, result.graphs[0][0])
        elif result.error is not None:
            new = needed_for_error(module, result.error)
        else:
            break
        if not new:
            break
        islands.extend(install_all(new))
    return islands


def install_all(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    for m in modules:
        install(m)
    return modules


def install(m: torch.nn.Module) -> None:
    rec = _Island(m)
    island_id, call = rec.id, _caller(type(m))

    def forward(*args, **kwargs):
        # A graph node may only output tensors: the structure is rebuilt here, in traced code.
        return rec.rebuild(call(island_id, args, kwargs))

    m._cachedit_island = rec  # the module keeps its record (and id) alive
    m.forward = forward


def uninstall(m: torch.nn.Module) -> None:
    rec = m.__dict__.pop("_cachedit_island", None)
    if rec is None:
        return
    if rec.had_forward:
        m.forward = rec.original
    else:
        m.__dict__.pop("forward", None)
