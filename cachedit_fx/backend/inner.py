"""The compilers the rewritten graph is handed to: Inductor (default), aot_eager, eager, TensorRT
(optional, CUDA only), or any callable with a Dynamo backend's signature."""
from __future__ import annotations

import logging
import pickle

import torch
from torch.fx import GraphModule

from ..errors import CacheditError, ConfigError

INNER_COMPILERS = ("inductor", "aot_eager", "eager", "tensorrt")
logger = logging.getLogger("diffusers.cachedit_fx")  # shown by diffusers.utils.logging.set_verbosity_info()

# Inductor options for a rewritten graph, under the caller's ``inner_options``. Inductor's size
# asserts would check every input on every call, the middle's weights twice (before the cond and
# again inside the full branch) and on a cached call for a branch that does not read them: Dynamo's
# guards check each input's sizes and strides already, a branch's operands come from the graph
# itself, and the state tensors are ours. At 0.3-1 us an assert, that is several percent of a small
# model's step.
#
# torch.cond is not cacheable by default (torch 2.13): a graph holding one would bypass Inductor's FX graph
# cache and AOTAutograd's cache, so a new process would compile it all again. Marked cacheable, the
# branches' code is part of the cache key (their GraphModules are pickled into it; a different branch
# body misses), which is what makes the cache safe for our conds.
CACHED_GRAPH_INDUCTOR_OPTIONS = {"size_asserts": False,
                                 "unsafe_marked_cacheable_functions": {"torch.ops.higher_order.cond": torch.__version__}}


def check_inner(inner) -> None:
    """Fail at configuration time, not at the first call."""
    if inner not in INNER_COMPILERS and not callable(inner):
        raise ConfigError(f"inner must be one of {INNER_COMPILERS} or a callable, got {inner!r}")
    if inner == "tensorrt":
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as e:  # ImportError, or a CUDA-less install failing at import
            raise CacheditError("inner='tensorrt' needs torch-tensorrt and a CUDA GPU: pip install "
                                "'cachedit-fx[tensorrt]' (torch-tensorrt==2.13.0 matches torch 2.13); "
                                f"import failed with: {e}") from e


def inner_compile(gm: GraphModule, example_inputs, inner, inner_options: dict | None = None,
                  inductor_defaults: dict | None = None, background: bool = False):
    """Compile ``gm`` for ``example_inputs`` with the named inner compiler; returns a callable.
    ``inductor_defaults``: Inductor options ``inner_options`` may override; ``background``: Inductor
    compiles in a child process, the graph running eagerly until then (backend/background.py)."""
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    if inner == "tensorrt":
        return _tensorrt_compile(gm, example_inputs, inner_options or {})
    patches = {**(inductor_defaults or {}), **(inner_options or {})}
    if background:
        compiled = _in_background(gm, example_inputs, patches)
        if compiled is not None:
            return compiled
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def _in_background(gm: GraphModule, example_inputs, patches: dict):
    """A :class:`~cachedit_fx.backend.background.BackgroundCompiled`, or None (logged) where the graph
    compiles in this process."""
    from . import background

    reason = background.why_not(gm, example_inputs)
    if reason is None:
        try:
            job = background.payload(gm, example_inputs, patches)
        except (TypeError, AttributeError, pickle.PicklingError) as e:  # a call target with no import path
            reason = f"the graph cannot be sent to another process ({e})"
        else:
            return background.BackgroundCompiled(gm, job)
    logger.info("cachedit: compiling in this process, not in the background: %s", reason)
    return None


def _tensorrt_compile(gm, example_inputs, inner_options):
    """TensorRT has no converter for torch.cond: compile the graph with the cond kept as a
    higher-order op by Torch-TensorRT's dynamo backend, which partitions unsupported ops (the cond
    and the state glue) to PyTorch and builds engines for the block segments around them."""
    import torch_tensorrt

    return torch_tensorrt.dynamo.compile(torch.export.export(gm, tuple(example_inputs)),
                                         inputs=list(example_inputs), **inner_options)
