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
from torch._C._dynamo.guards import dict_version

# Containers are described this deep; anything deeper by type and identity.
_DEPTH = 3
_SIMPLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)
_PLAIN = frozenset(_SIMPLE[:-1])  # the exact types, found without isinstance
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
    return _Watched(module).print


class _Watched:
    """A module's fingerprint and what can change it without a new one being computed: the dicts it
    read (by CPython's dict version, which any write bumps), the lists and sets (by a shallow copy) and
    the tensors (by metadata: ``p.data = ...`` changes a parameter's shape and no dict)."""

    def __init__(self, module: torch.nn.Module):
        self.dicts, self.seqs, self.tensors = [], [], []
        parts = []
        for path, m in module.named_modules(remove_duplicate=False):
            d = m.__dict__
            self.dicts += [d, d["_parameters"], d["_buffers"], d["_modules"]]
            tensors = tuple((k, self._tensor(v)) for kind in ("_parameters", "_buffers") for k, v in d[kind].items())
            children = tuple((k, type(v)) for k, v in d["_modules"].items())
            attrs = tuple((k, self._describe(v, _DEPTH)) for k, v in d.items() if k not in _OWN)
            parts.append((path, type(m), tensors, children, attrs))
        self.print = tuple(parts)
        self.versions = list(map(dict_version, self.dicts))
        self.copies = [type(s)(s) for s in self.seqs]
        self.metas = list(map(_tensor, self.tensors))

    def unchanged(self) -> bool:
        """True when nothing the fingerprint read was written since (C-level compares, once per request);
        False when something was (the fingerprint may still be equal: compare a new one)."""
        return list(map(dict_version, self.dicts)) == self.versions and \
            all(type(s)(s) == c for s, c in zip(self.seqs, self.copies)) and \
            list(map(_tensor, self.tensors)) == self.metas

    def _tensor(self, t):
        if t is not None:
            self.tensors.append(t)
        return _tensor(t)

    def _describe(self, v, depth: int):
        t = type(v)
        if t in _PLAIN or isinstance(v, _SIMPLE):
            return t, v
        if isinstance(v, torch.Tensor):
            return self._tensor(v)
        if isinstance(v, torch.nn.Module):
            return t, id(v)  # its own entry describes it
        if depth and isinstance(v, (tuple, list, set, frozenset)):
            if isinstance(v, (list, set)):
                self.seqs.append(v)
            items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
            return t, tuple(self._describe(x, depth - 1) for x in items)
        if depth and isinstance(v, dict):  # hook dicts, peft's scaling and active adapters, diffusers' config
            self.dicts.append(v)
            return t, tuple((k, self._describe(x, depth - 1)) for k, x in v.items())
        return t, id(v)


def _tensor(t) -> tuple | None:
    if t is None:
        return None
    return type(t), tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad


class OwnedGuards:
    """Whether an install's one-graph compile runs guard-light, and the module's fingerprint to check."""

    def __init__(self) -> None:
        self.light = False  # the compiled forward drops the module's guards
        self._watched: _Watched | None = None
        self._requests_seen = 0

    def filter_for(self, handle):
        """The ``guard_filter_fn`` for a one-graph compile now, or None (full guards): light only where a
        request was marked on the host before (``handle.requests``)."""
        self.light = handle.requests > 0
        return drop_module_guards if self.light else None

    def compiled(self, module: torch.nn.Module, handle) -> None:
        """A one-graph compile succeeded: the module as it was compiled."""
        self._watched = _Watched(module) if self.light else None
        self._requests_seen = handle.requests

    def stale(self, module: torch.nn.Module, handle) -> bool:
        """At a call: a request started since the last check and the module is not the one compiled. The
        check runs once per request (one integer compared per call otherwise): C-level compares of what
        the fingerprint read, and a new fingerprint only when one of those was written."""
        watched = self._watched
        if watched is None or handle.requests == self._requests_seen:
            return False
        self._requests_seen = handle.requests
        if watched.unchanged():
            return False
        now = _Watched(module)
        if now.print != watched.print:
            return True
        self._watched = now  # written with equal values (a flag set again): watch the new versions
        return False

    def forget(self) -> None:
        self.light, self._watched = False, None
