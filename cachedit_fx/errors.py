"""The errors cachedit-fx raises. Catch :class:`CacheditError` for all of them.

Errors are typed so that callers decide by class, never by message text: a :class:`ConfigError` is the
user's to fix (it names the field and the allowed values), a :class:`NoCacheableChain` is the passes
saying they cannot cache this graph (the callers then compile it uncached with one warning).
"""
from __future__ import annotations


class CacheditError(Exception):
    """Base class of every error raised by cachedit-fx."""


class ConfigError(CacheditError, ValueError):
    """A config field, backend option or argument has a value outside what it accepts."""


class NoCacheableChain(CacheditError):
    """The graph holds no block chain the passes can rewrite; the message says why."""


class CaptureError(CacheditError, RuntimeError):
    """A forward cannot be captured as one Dynamo graph (data-dependent control flow, an op Dynamo
    cannot trace); the message names the model and the line that breaks it."""


class ExportError(CacheditError, ValueError):
    """A model cannot be exported as a cached package; the message says why and what to do."""


class IslandsNeeded(CacheditError):
    """Raised by the backend enable_cache installs when a graph's blocks hold data-dependent nodes: the
    install makes those submodules islands (islands.py) and compiles again."""

    def __init__(self, classes: set[type]):
        super().__init__(f"graph nodes with data-dependent shapes in {sorted(c.__name__ for c in classes)}")
        self.classes = classes


class MissingDependency(CacheditError, RuntimeError):
    """A feature needs an optional package or program that is not installed; the message says how to
    install it."""
