"""A request's later calls without Dynamo's frame: the compiled graph called directly.

A guard-light install (owned.py) checks the module once per request. What Dynamo's frame still does on
every call — look its cache entry up, evaluate the remaining guards (the inputs' metadata, global state,
module-level objects), fetch every parameter as a graph input by its source, call the graph, build the
return value from its outputs — cost a small model's cached call more than the cached step's own kernels
(docs/architecture.md). So the first call of a request with a given call key goes through Dynamo, and
what it did is learned: which graph it called, the source of each graph input, how the return value was
built. The request's later calls with that key call the graph directly: the inputs fetched by their
sources on every call (a weight changed in place or re-assigned is read as Dynamo would), the return
value built the same way.

The key of a call holds what Dynamo's remaining guards read from the call: every tensor argument's type,
shape, strides, dtype, device, requires_grad and inference flag, every other argument by type and value
(plain values, containers of them), no tensor passed twice; and Dynamo's global-state check (grad mode,
autocast, default dtype ...) must pass as it did, with no torch function mode active (a device
context). Any other call goes through Dynamo: an argument the key
cannot describe, a frame with effects Dynamo's code replays after the graph, a graph input whose source
does not give back what Dynamo passed. Module-level objects Dynamo guards (an attention backend switched)
are seen at the next request, as the module's own changes are (owned.py).
"""
from __future__ import annotations

import inspect
import types

import torch
from torch._C._dynamo.guards import GlobalStateGuard
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture.frame import frame_has_side_effects, input_sources

_PLAIN = frozenset((type(None), bool, int, float, str, torch.dtype, torch.device))
_DEPTH = 3  # containers in the arguments are described this deep
_function_modes = torch._C._len_torch_function_stack


class _Unkeyable(Exception):
    pass


def call_key(args: tuple, kwargs: dict):
    """What Dynamo's input guards read from a call, as one hashable value; None where an argument is
    not described (an object of another type, a container too deep) or a tensor is passed twice."""
    tensors: list = []
    try:
        key = (tuple(_describe(v, tensors, _DEPTH) for v in args),
               tuple((k, _describe(v, tensors, _DEPTH)) for k, v in kwargs.items()))
    except _Unkeyable:
        return None
    if len(set(map(id, tensors))) != len(tensors):
        return None
    return key


def _describe(v, tensors: list, depth: int):
    t = type(v)
    if t in _PLAIN:
        return t, v
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return t, v.shape, v.stride(), v.dtype, v.device, v.requires_grad, v.is_inference()
    if depth and t in (tuple, list):
        return t, tuple(_describe(x, tensors, depth - 1) for x in v)
    if depth and t is dict:
        return t, tuple((k, _describe(x, tensors, depth - 1)) for k, x in v.items())
    raise _Unkeyable


class ObservedGraph:
    """A compiled graph as Dynamo's code calls it, with what its frame told at compile time: the source
    of each input (None: not fetchable) and whether the frame has side effects."""

    def __init__(self, fn, sources: list[str] | None, side_effects: bool, calls: "DirectCalls"):
        self.fn, self.sources, self.side_effects, self._calls = fn, sources, side_effects, calls
        self._fetch = None  # built on first use (fetcher)

    def __call__(self, *args):
        out = self.fn(*args)
        seen = self._calls.seen
        if seen is not None:
            seen.append((self, args, out))
        return out

    def fetcher(self):
        """(``fetch(L, G, bases) -> graph inputs``, ``resolve(L, G) -> bases``), compiled from the sources
        once. A parameter or buffer is read from its owner's ``_parameters`` / ``_buffers`` dict on every
        call, the dicts (``bases``) resolved once per request: re-assigning a parameter writes into them."""
        if self._fetch is None:
            bases, parts = [], []
            for name in self.sources:
                base, _, item = name.rpartition("[")
                if name.startswith("L['self']") and base.endswith(("._parameters", "._buffers")):
                    if base not in bases:
                        bases.append(base)
                    parts.append(f"B[{bases.index(base)}][{item}")
                else:
                    parts.append(name)
            fetch = eval("lambda L, G, B: [" + ", ".join(parts) + "]", {})  # noqa: S307 - Dynamo's own sources
            resolve = eval("lambda L, G: (" + "".join(b + ", " for b in bases) + ")", {})  # noqa: S307
            self._fetch = fetch, resolve
        return self._fetch


class _Learned:
    """One call key's direct call within one request."""

    __slots__ = ("graph", "bind", "globals", "fetch", "bases", "rebuild", "request", "state")

    def __call__(self, args, kwargs):
        return self.rebuild(self.graph.fn(*self.fetch(self.bind(*args, **kwargs), self.globals, self.bases)))


class DirectCalls:
    """The direct calls of one install, learned per request and call key."""

    def __init__(self) -> None:
        self.seen: list | None = None  # graph calls observed during a call through Dynamo
        self._learned: dict = {}
        self._binders: dict = {}  # forward function -> binder of its arguments into the frame's locals
        self.hits = 0  # calls made directly (tests read it)

    @staticmethod
    def frame_of(gm) -> tuple:
        """What the frame being compiled tells of ``gm`` (call inside the backend call, before the graph
        is changed): its inputs' sources, whether the frame has side effects."""
        return input_sources(gm), frame_has_side_effects()

    def observe(self, fn, frame: tuple) -> ObservedGraph:
        """``fn``, a graph the backend compiled, as Dynamo's code will call it."""
        return ObservedGraph(fn, *frame, self)

    def lookup(self, key, request: int):
        """The direct call for ``key`` learned in this request, where the global state is as it was."""
        learned = self._learned.get(key) if key is not None else None
        if learned is None or learned.request != request or not learned.state.check() or _function_modes():
            return None
        self.hits += 1
        return learned

    def through_dynamo(self, call, key, request: int, forward, args: tuple, kwargs: dict):
        """``call()`` (the forward through Dynamo), learning its direct call for ``key`` in this request."""
        if key is None or _function_modes():  # Dynamo guards the mode stack (e.g. torch.device(...) as a context)
            return call()
        self.seen = []
        try:
            out = call()
            seen = self.seen
        finally:
            self.seen = None
        learned = self._learn(seen, forward, args, kwargs, out)
        if learned is None:
            self._learned.pop(key, None)
        else:
            learned.request = request
            self._learned[key] = learned
        return out

    def forget(self) -> None:
        self._learned.clear()

    def _learn(self, seen: list, forward, args, kwargs, out) -> _Learned | None:
        if len(seen) != 1 or not isinstance(getattr(forward, "__func__", None), types.FunctionType):
            return None  # a frame per graph break, or a forward whose frame is not a bound function's
        graph, inputs, outputs = seen[0]
        if graph.sources is None or graph.side_effects:
            return None
        rebuild = _rebuilder(out, outputs)
        bind = self._binder(forward.__func__)
        if rebuild is None or bind is None:
            return None
        learned = _Learned()
        learned.bind = types.MethodType(bind, forward.__self__)
        learned.graph, learned.globals, learned.rebuild = graph, forward.__func__.__globals__, rebuild
        try:
            fetch, resolve = graph.fetcher()
            local = learned.bind(*args, **kwargs)
            learned.fetch, learned.bases = fetch, resolve(local, learned.globals)
            again = fetch(local, learned.globals, learned.bases)
        except Exception:  # noqa: BLE001 - a source this scope cannot evaluate: Dynamo keeps the call
            return None
        if len(again) != len(inputs) or not all(map(_same_input, again, inputs)):
            return None
        learned.state = GlobalStateGuard()
        return learned

    def _binder(self, func):
        if func not in self._binders:
            self._binders[func] = _binder_for(func)
        return self._binders[func]


def _same_input(a, b) -> bool:
    """A fetched graph input is what Dynamo passed: the same tensor, or an equal number of the same type."""
    return a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)


def _binder_for(func: types.FunctionType):
    """A function with ``func``'s signature that returns its locals at entry (the frame's ``L``), or None
    where the signature cannot be written again."""
    try:
        params = list(inspect.signature(func, follow_wrapped=False).parameters.values())
    except (TypeError, ValueError):
        return None
    text, star = [], False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star:
            text.append("*")
            star = True
        default = "=None" if p.default is not p.empty else ""
        text.append({p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name + default)
        star = star or p.kind is p.VAR_POSITIONAL
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            text.append("/")
    scope: dict = {}
    exec(f"def frame_locals({', '.join(text)}):\n    return locals()", scope)  # noqa: S102 - names from a signature
    bind = scope["frame_locals"]
    bind.__defaults__, bind.__kwdefaults__ = func.__defaults__, func.__kwdefaults__
    return bind


def _rebuilder(out, outputs):
    """A function building the forward's return value from the graph's outputs as ``out`` was built, or
    None where ``out`` holds a tensor the graph did not return or an object other than plain values."""
    where = {id(o): j for j, o in enumerate(outputs) if isinstance(o, torch.Tensor)}
    if type(out) is tuple and all(isinstance(x, torch.Tensor) and id(x) in where for x in out):
        index = [where[id(x)] for x in out]
        return lambda o: tuple(o[j] for j in index)
    leaves, spec = tree_flatten(out)
    plan = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) not in where:
                return None
            plan.append((True, where[id(leaf)]))
        elif type(leaf) in _PLAIN:
            plan.append((False, leaf))
        else:
            return None
    return lambda o: tree_unflatten([o[v] if is_output else v for is_output, v in plan], spec)
