"""What the install reads off a call's arguments: the timestep and latent tensors (which tell requests
apart), a Python float that changes call by call (a float timestep), and the CFG branch the caller
names through diffusers' ``cache_context``."""
from __future__ import annotations

import collections
import inspect

import torch

from ..config import SeparateCFG

# A float argument with this many values in twice as many calls is a timestep (CFG pairs repeat it).
FLOAT_WINDOW = 3


def call_inputs(forward, args, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The call's (timestep, latent) tensors: a one-dimensional argument named like a timestep
    (``timestep``, ``t``, ``sigma``, ``noise_level``), and ``hidden_states`` or the first tensor argument."""
    try:
        bound = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    bound = {**bound.pop("kwargs", {}), **bound} if isinstance(bound.get("kwargs"), dict) else bound
    tensors = {name: v for name, v in bound.items() if isinstance(v, torch.Tensor)}
    timestep = next((v for name, v in tensors.items() if v.dim() <= 1 and (
        "timestep" in name.lower() or name in ("t", "sigma", "sigmas", "noise_level"))), None)
    if timestep is None:  # the latent tells requests apart only beside a timestep
        return None, None
    return timestep, tensors.get("hidden_states", next(iter(tensors.values()), None))


def parameter_name(forward, key) -> str:
    """A call argument's name: keyword arguments by theirs, positional ones by the forward's signature."""
    if isinstance(key, str):
        return repr(key)
    params = list(inspect.signature(forward).parameters)
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
