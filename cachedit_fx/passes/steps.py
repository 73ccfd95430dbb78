"""The step functions a rewritten graph calls, importable by a name that says what they compute.

AOTAutogradCache keys a graph by pickling it, and a GraphModule pickles the functions it calls by their
import path. A step function is a closure over its chain's layout, with no import path of its own: every
rewritten graph bypassed the cache, so a restart traced it through AOTAutograd again. Each one is
published here under its name and ``cache_tag`` (a digest of what it computes) when it is made, which is
when its graph compiles and is pickled; a later function of the same tag computes the same and takes
the name over.

A step pickles by value (its step.py function, layout, name and tag): backend/wire.py sends a graph's step
calls that way to the process that compiles it (backend/background.py), where unpickling publishes it here.
"""
from __future__ import annotations

import sys


class TaggedStep:
    """``step_fn(layout, *args)`` (a runtime/step.py function; ``flat``: its BranchOut flattened) with its
    ``cache_tag``, named ``<name>_<tag>`` and found under that name here; ``step_name`` is the name without
    the tag (what reports show)."""

    def __init__(self, step_fn, layout, name: str, tag: str, flat: bool = False):
        self.step_fn, self.layout, self.flat = step_fn, layout, flat
        self.cache_tag, self.step_name = tag, name
        self.__name__ = self.__qualname__ = f"{name}_{tag}"
        self.__module__ = __name__
        setattr(sys.modules[__name__], self.__name__, self)

    def __call__(self, *args, **kwargs):
        out = self.step_fn(self.layout, *args, **kwargs)
        return out.flat() if self.flat else out

    def __reduce__(self):
        return TaggedStep, (self.step_fn, self.layout, self.step_name, self.cache_tag, self.flat)

    def __repr__(self) -> str:
        return f"<cachedit step {self.__name__}>"
