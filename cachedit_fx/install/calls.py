"""What the install reads off a call's arguments: the timestep and latent tensors (which tell requests
apart), a Python float timestep (handed to the forward as a tensor) or another float that changes call by
call, and the CFG branch the caller names through diffusers' ``cache_context``."""
from __future__ import annotations

import collections
import inspect
import types
import weakref

import torch

from ..capture.scalars import timestep_named
from ..config import SeparateCFG

# A float argument with this many values in twice as many calls is a timestep (CFG pairs repeat it).
FLOAT_WINDOW = 3


# Parameter names by function, for plain functions and for methods bound to an instance (their first
# parameter dropped, as inspect.signature does: a ``*args`` first parameter stays).
_NAMES = (weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary())


def parameter_names(forward) -> tuple[str, ...]:
    """``forward``'s parameter names in order, found once per function (``inspect.signature`` costs
    ~25 us, a tenth of a small model's cached call)."""
    bound = isinstance(forward, types.MethodType)
    func, names_of = (forward.__func__ if bound else forward), _NAMES[bound]
    try:
        names = names_of.get(func)
        if names is None:
            names = names_of[func] = tuple(inspect.signature(forward).parameters)
    except TypeError:  # not weak-referenceable: a builtin
        return tuple(inspect.signature(forward).parameters)
    return names


def _bound(forward, args, kwargs) -> dict:
    """The call's arguments by parameter name (a ``**kwargs`` parameter's entries at the top level)."""
    try:
        bound = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    return {**bound.pop("kwargs", {}), **bound} if isinstance(bound.get("kwargs"), dict) else bound


def call_inputs(forward, args, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The call's (timestep, latent) tensors: an argument of at most one dimension named like a timestep
    (:func:`timestep_named`), and ``hidden_states`` or the first tensor argument."""
    tensors = {name: v for name, v in _bound(forward, args, kwargs).items() if isinstance(v, torch.Tensor)}
    timestep = next((v for name, v in tensors.items() if v.dim() <= 1 and timestep_named(name)), None)
    if timestep is None:  # the latent tells requests apart only beside a timestep
        return None, None
    return timestep, tensors.get("hidden_states", next(iter(tensors.values()), None))


class FloatTimestep:
    """A Python ``float`` argument named like a timestep, handed to the forward as a 0-dim float32 tensor
    on the latent's device: the compiler would specialise on a float's value (a graph per value, each
    with its own state); a tensor is one graph input, found as the timestep by dataflow like any other.
    float32 is what ``torch.tensor([t])`` of a float makes, so the model computes what it would from the
    float (a 0-dim tensor stands in for a number in torch ops and Python arithmetic)."""

    def __init__(self) -> None:
        self.dropped = False  # the forward needs the float itself: calls keep their arguments
        self.proven = False  # a call with inputs seen before compiled nothing new: one graph serves every value
        self.converted = False
        self._seen: set = set()

    @property
    def on_probation(self) -> bool:
        """Converted and not proven yet: what the install warns about may follow from the conversion."""
        return self.converted and not (self.proven or self.dropped)

    def convert(self, forward, args, kwargs):
        """(args, kwargs, the parameter's name) with the float timestep as a tensor, or None when the
        call has none (or the conversion was dropped)."""
        if self.dropped or not any(isinstance(v, float) for v in (*args, *kwargs.values())):
            return None
        names = parameter_names(forward)
        keys = [*((i, names[i] if i < len(names) else None) for i in range(len(args))), *((k, k) for k in kwargs)]
        key, name = next(((k, n) for k, n in keys if n is not None and timestep_named(n) and
                          isinstance(args[k] if isinstance(k, int) else kwargs[k], float)), (None, None))
        if key is None:
            return None
        self.converted = True
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        latent = kwargs.get("hidden_states", tensors[0] if tensors else None)
        value = args[key] if isinstance(key, int) else kwargs[key]
        t = torch.full((), value, dtype=torch.float32, device=latent.device if latent is not None else None)
        if isinstance(key, int):
            return (*args[:key], t, *args[key + 1:]), kwargs, name
        return args, {**kwargs, key: t}, name

    def repeats_inputs(self, args, kwargs) -> bool:
        """Whether an earlier call had the same inputs up to the timestep's value (tensor shapes, dtypes
        and devices; other arguments' values; grad mode), remembering these."""
        def sig(v):
            if isinstance(v, torch.Tensor):
                return ("tensor", tuple(v.shape), v.dtype, v.device)
            return v if isinstance(v, (int, float, bool, str, type(None))) else type(v)

        key = (tuple(map(sig, args)), tuple((k, sig(v)) for k, v in kwargs.items()), torch.is_grad_enabled())
        seen = key in self._seen
        self._seen.add(key)
        return seen


def parameter_name(forward, key) -> str:
    """A call argument's name: keyword arguments by theirs, positional ones by the forward's signature."""
    if isinstance(key, str):
        return repr(key)
    params = parameter_names(forward)
    return repr(params[key]) if key < len(params) else f"argument {key}"


class FloatArguments:
    """The last calls' values of each Python float argument, to find one that changes call by call (a
    float timestep: the compiler specialises on its value, a graph per value). A float that changes per
    request only (a guidance scale) does not count."""

    def __init__(self) -> None:
        self._seen: dict = {}

    def changing(self, args, kwargs):
        """The key (position or name) of a float argument with ``FLOAT_WINDOW`` values in the last
        ``2 * FLOAT_WINDOW`` calls, or None."""
        for k, v in (*enumerate(args), *kwargs.items()):
            if not isinstance(v, float):
                continue
            seen = self._seen.setdefault(k, collections.deque(maxlen=2 * FLOAT_WINDOW))
            seen.append(v)
            if len(set(seen)) >= FLOAT_WINDOW:
                return k
        return None


def branch_of_call(context, separate: SeparateCFG, cfg_compute_first: bool) -> int | None:
    """The CFG branch diffusers' ``cache_context("cond" / "uncond")`` names for the call in flight; None
    without a name (Chroma, Lumina2, a bare transformer: the graph tells a CFG pair's second call on
    device by its repeated timestep) or with one state set."""
    if context is None or separate is SeparateCFG.OFF:
        return None
    branch = {"cond": 0, "uncond": 1}.get(context.name)
    if branch is not None and cfg_compute_first:
        branch = 1 - branch
    return branch
