"""Compiles that keep to themselves: each on a private copy of the forward's code object."""
from __future__ import annotations

import torch

from cachedit_fx.capture.dynamo import private_code


def compile_own(model, **kwargs):
    """``torch.compile(model, **kwargs)`` on a private copy of ``model.forward``'s code object.

    Dynamo keeps compiled entries, and counts ``recompile_limit`` (8), per code object; every instance
    of a class shares its forward's code, so the compiles of one class across the suite would pile up on
    one code object (and each call walk the others' guards). A private copy gives each compile its own
    entries, as ``enable_cache`` does, and no ``torch._dynamo.reset()`` is needed between tests."""
    model.forward = private_code(model.forward)
    return torch.compile(model, **kwargs)
