"""Guards on what an install owns, checked once per request instead of on every call.

Dynamo guards a compiled forward on everything the trace read: the inputs, global state and
module-level objects, and the whole transformer — every submodule's type, hook dicts and the attributes
its forward read, every parameter's and buffer's metadata. On a small model the transformer's part is
most of a cached call's host time (the Fn-only copy has a fraction of those guards). An install owns
the transformer, and the transformer changes only between requests in practice (a LoRA loaded, an
adapter disabled, weights swapped), so its one-graph compile drops the guards rooted at the module
(:func:`drop_module_guards`) and the install compares a :func:`fingerprint` of the module at the start
of every request it can see instead: a change compiles again (islands stay).

A weight changed in place, or re-assigned with the same metadata, needs no compile: the graph takes the
parameters as inputs, read off the module on every call. The light guards hold only where the caller
marks requests on the host: a pipeline does on every call, and so do ``cachedit_fx.reset`` and the
handle's ``reset``; an install first called before any request was marked keeps Dynamo's full guards.
"""
from __future__ import annotations

import enum

import torch

# Containers are described this deep; anything deeper by type and identity.
_DEPTH = 3
_SIMPLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)
# A module's __dict__ entries described on their own (the rest by _describe)
_OWN = ("_parameters", "_buffers", "_modules")


def drop_module_guards(entries) -> list[bool]:
    """A ``guard_filter_fn`` for a one-graph compile of an installed forward: keep every guard except
    those rooted at the module (the frame's ``self``): inputs, global state and module-level objects
    stay guarded on every call; the module is checked per request (:func:`fingerprint`).

    Args:
        entries: Dynamo's ``GuardFilterEntry`` list.
    Returns:
        One bool per entry: keep it.
    """
    return [not _on_module(e) for e in entries]


def _on_module(entry) -> bool:
    source = entry.orig_guard.source if entry.orig_guard is not None else None
    root = entry.name.split(".", 1)[0].split("[", 1)[0]
    return root == "self" and source is not None and source.is_unspecialized_nn_module()


def fingerprint(module: torch.nn.Module) -> tuple:
    """What the dropped guards checked, as one comparable value: every submodule's path and type, its
    instance attributes (plain values by value, containers element-wise, tensors by metadata, other
    objects by type and identity, hook dicts by their hooks), and every parameter's and buffer's
    metadata (type, shape, stride, dtype, device, requires_grad; not its values nor its identity).

    Args:
        module: the installed transformer.
    Returns:
        A tuple equal for two calls exactly when none of these changed.
    """
    parts = []
    for path, m in module.named_modules(remove_duplicate=False):
        d = m.__dict__
        tensors = tuple((k, _tensor(v)) for kind in ("_parameters", "_buffers") for k, v in d[kind].items())
        children = tuple((k, type(v)) for k, v in d["_modules"].items())
        attrs = tuple((k, _describe(v, _DEPTH)) for k, v in d.items() if k not in _OWN)
        parts.append((path, type(m), tensors, children, attrs))
    return tuple(parts)


def _tensor(t) -> tuple | None:
    if t is None:
        return None
    return type(t), tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad


def _describe(v, depth: int):
    if isinstance(v, _SIMPLE):
        return type(v), v
    if isinstance(v, torch.Tensor):
        return _tensor(v)
    if isinstance(v, torch.nn.Module):
        return type(v), id(v)  # its own entry describes it
    if depth and isinstance(v, (tuple, list, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        return type(v), tuple(_describe(x, depth - 1) for x in items)
    if depth and isinstance(v, dict):  # hook dicts, peft's scaling and active adapters, diffusers' config
        return type(v), tuple((k, _describe(x, depth - 1)) for k, x in v.items())
    return type(v), id(v)


class OwnedGuards:
    """Whether an install's one-graph compile runs guard-light, and the module's fingerprint to check."""

    def __init__(self) -> None:
        self.light = False  # the compiled forward drops the module's guards
        self._print: tuple | None = None
        self._requests_seen = 0

    def filter_for(self, handle):
        """The ``guard_filter_fn`` for a one-graph compile now, or None (full guards): light only where a
        request was marked on the host before (``handle.requests``)."""
        self.light = handle.requests > 0
        return drop_module_guards if self.light else None

    def compiled(self, module: torch.nn.Module, handle) -> None:
        """A one-graph compile succeeded: the module as it was compiled."""
        self._print = fingerprint(module) if self.light else None
        self._requests_seen = handle.requests

    def stale(self, module: torch.nn.Module, handle) -> bool:
        """At a call: a request started since the last check and the module is not the one compiled. The
        check itself runs once per request (one integer compared per call otherwise)."""
        if self._print is None or handle.requests == self._requests_seen:
            return False
        self._requests_seen = handle.requests
        return fingerprint(module) != self._print

    def forget(self) -> None:
        self.light, self._print = False, None
