"""The step functions a rewritten graph calls, importable by a name that says what they compute.

AOTAutogradCache keys a graph by pickling it, and a GraphModule pickles the functions it calls by their
import path. A step function is a closure over its chain's layout, with no import path of its own: every
rewritten graph bypassed the cache, so a restart traced it through AOTAutograd again. Each one is
published here under its name and ``cache_tag`` (a digest of what it computes) when it is made, which is
when its graph compiles and is pickled; a later function of the same tag computes the same and takes
the name over.
"""
from __future__ import annotations

import sys


class TaggedStep:
    """A step function with its ``cache_tag``, named ``<name>_<tag>`` and found under that name here;
    ``step_name`` is the name without the tag (what reports show)."""

    def __init__(self, fn, name: str, tag: str):
        self.fn, self.cache_tag, self.step_name = fn, tag, name
        self.__name__ = self.__qualname__ = f"{name}_{tag}"
        self.__module__ = __name__
        setattr(sys.modules[__name__], self.__name__, self)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<cachedit step {self.__name__}>"
