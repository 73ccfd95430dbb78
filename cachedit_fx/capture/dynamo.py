"""Capture a forward as the FX graph(s) Dynamo makes of it, leaving Dynamo's caches as they were.

Every capture in the package goes through :func:`trace`. Nothing here calls ``torch._dynamo.reset()``,
which would drop the compiled code of every other model in the process: a trace compiles a private
copy of the forward's code in an isolated recompile region, so its cache entries die with the copy and
count against no other compile's recompile limit (frames a graph break leaves to compile on their own
included).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import types
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from ..errors import CacheditError, CaptureError, IslandsNeeded

# What a full-graph compile raises when the forward does not fit one graph: a construct Dynamo cannot
# trace, a data-dependent value, a higher-order op it cannot capture. Anything else is the model's own error.
GRAPH_BREAK_ERRORS = (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError,
                      torch._dynamo.exc.UncapturedHigherOrderOpError)


@dataclass
class Trace:
    """The graphs Dynamo made (with their example inputs), or the error that stopped a one-graph trace."""

    graphs: list[tuple[GraphModule, list]] = field(default_factory=list)
    error: Exception | None = None


def _logging_methods() -> set:
    names = ("debug", "info", "warning", "warn", "error", "exception", "critical", "log",
             "warning_once", "info_once")  # the *_once methods are what transformers adds to Logger
    return {getattr(logging.Logger, name) for name in names if hasattr(logging.Logger, name)}


class _LoggingIgnored:
    """Dynamo's ``ignore_logging_functions`` extended by the logger methods while Dynamo compiles a frame
    for one of our calls, and only then. Setting the config on every call cost ~4.5 us (two reads and a
    write through Dynamo's config module, ~0.7 % of a small model's cached step); a thread-local count of
    our calls in progress costs ~0.2 us, and Dynamo's compile-start and -end callbacks, which run before
    tracing starts and after it ends (failed or not), read it."""

    def __init__(self):
        self.local = threading.local()
        self.methods = _logging_methods()

    def start(self, args) -> None:
        if getattr(self.local, "calls", 0) and not hasattr(self.local, "before"):
            config = torch._dynamo.config
            self.local.before = config.ignore_logging_functions
            config.ignore_logging_functions = self.local.before | self.methods

    def end(self, args) -> None:
        if hasattr(self.local, "before"):
            torch._dynamo.config.ignore_logging_functions = self.local.before
            del self.local.before

    def register(self) -> None:
        """(Again) after ``torch._dynamo.reset()``, which drops every callback."""
        handler = torch._dynamo.callback_handler
        if self.start not in handler.start_callbacks:
            handler.register_start_callback(self.start)
            handler.register_end_callback(self.end)


_IGNORED = _LoggingIgnored()


def logging_ignored(fn):
    """``fn`` with the ``logging.Logger`` calls in the code Dynamo traces dropped, as torch.export drops
    them: otherwise a library's log call in the forward breaks the graph (diffusers' context-parallel
    hooks call ``logger.warning_once`` when a planned input, e.g. Wan's 1-D timestep, is not split)."""
    local = _IGNORED.local

    @functools.wraps(fn)
    def call(*args, **kwargs):
        _IGNORED.register()
        local.calls = getattr(local, "calls", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            local.calls -= 1
    return call


def private_code(method):
    """``method`` rebound on a private copy of its function's code object.

    Dynamo keeps compiled entries, and counts ``recompile_limit`` (8), per code object. A transformer's
    forward code is shared by every instance of its class, by all diffusers transformers whose forward
    is wrapped by the peft ``apply_lora_scale`` decorator, and by every module carrying diffusers hooks
    (the registry's forward is one ``functools.partial`` of one function for all of them, e.g. after
    ``enable_parallelism``): compiling it directly made the 9th compile in a process hit the limit and
    silently run eager. A private copy gives each compile its own entries, freed with it. A bound method
    and a ``functools.partial`` of a function are copied; anything else is returned as it is.
    """
    if isinstance(method, functools.partial) and isinstance(method.func, types.FunctionType):
        copy = functools.partial(_private_function(method.func), *method.args, **method.keywords)
        copy.__dict__.update(method.__dict__)  # functools.update_wrapper's __wrapped__, __name__ ...
        return copy
    if not isinstance(method, types.MethodType) or not isinstance(method.__func__, types.FunctionType):
        return method
    return types.MethodType(_private_function(method.__func__), method.__self__)


def _private_function(f: types.FunctionType) -> types.FunctionType:
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__dict__.update(f.__dict__)
    g.__qualname__, g.__module__, g.__doc__ = f.__qualname__, f.__module__, f.__doc__
    return g


@contextlib.contextmanager
def _quiet_dynamo():
    log = logging.getLogger("torch._dynamo")
    level = log.level
    log.setLevel(logging.ERROR)  # a probe's graph breaks and recompile notes are not the user's to read
    try:
        yield
    finally:
        log.setLevel(level)


def trace(fn, args=(), kwargs=None, *, fullgraph: bool = True) -> Trace:
    """Dynamo's graph(s) of ``fn(*args, **kwargs)`` under ``no_grad`` with static shapes (dims marked
    dynamic on the inputs excepted), compiled from a private copy of the forward's code and run once.

    Args:
        fn: a module (its ``forward`` is traced) or a callable (a module's bound ``forward``).
        fullgraph: True: one graph, or the error that stopped it (``Trace.error``; the function's own
            exceptions and dynamic-shape constraint violations included). False: every graph of the
            forward split at its graph breaks.

    Returns:
        A :class:`Trace`.
    """
    graphs: list = []

    def keep(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    forward = private_code(fn.forward if isinstance(fn, torch.nn.Module) else fn)
    compiled = logging_ignored(torch.compile(forward, backend=keep, fullgraph=fullgraph, dynamic=False,
                                             isolate_recompiles=True))
    with torch.no_grad(), _quiet_dynamo():
        if not fullgraph:
            compiled(*args, **(kwargs or {}))
            return Trace(graphs)
        try:
            compiled(*args, **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - the caller decides what a failed one-graph trace means
            return Trace(error=e)
    return Trace(graphs)


def _causes(error: BaseException | None):
    while error is not None:
        yield error
        error = getattr(error, "inner_exception", None) or error.__cause__


def breaks_graph(error: BaseException) -> bool:
    """Did a full-graph compile fail because the forward does not fit one graph (or because the
    backend asked for islands), rather than because tracing the model's code failed (e.g. on a shape
    mismatch) or our own backend refused it (a config error)?

    A ``raise`` in the model's code reaches here as an ``Unsupported`` "Observed exception" and counts
    as a break: the compile with breaks is then the forward's first real run, and raises the model's
    own exception as it is.
    """
    return isinstance(error, GRAPH_BREAK_ERRORS) or any(isinstance(e, IslandsNeeded) for e in _causes(error))


def raised_by_model(error: BaseException) -> bool:
    """Did tracing stop at a ``raise`` in the model's own code? No island or eager cache changes that:
    the model raises the same error uncached."""
    return any(isinstance(e, torch._dynamo.exc.ObservedException) for e in _causes(error))


def our_error(error: BaseException) -> CacheditError | None:
    """The cachedit error a Dynamo error wraps (a backend's ``BackendCompilerFailed``), if any."""
    return next((e for e in _causes(error) if isinstance(e, CacheditError)), None)


def capture(module: torch.nn.Module, args=(), kwargs=None) -> tuple[GraphModule, list]:
    """Run Dynamo over ``module(*args, **kwargs)`` and return the (single) graph and example inputs.

    A construct Dynamo cannot trace may sit on a path a model takes only on its first call (Z-Image
    builds its RoPE table lazily under ``with torch.device(...)``): the module is then run once eagerly
    and traced again. A forward that still does not fit one graph — or that fails on data-dependent
    values (Lumina2's mask lengths, HiDream's MoE routing), which no rerun fixes — raises
    :class:`~cachedit_fx.errors.CaptureError` naming the model and the line that breaks it. Errors that
    are not Dynamo's (the model's own, or a dynamic-shape constraint) propagate unchanged.
    """
    kwargs = kwargs or {}
    result = trace(module, args, kwargs)
    if isinstance(result.error, torch._dynamo.exc.Unsupported):
        with torch.no_grad():
            module(*args, **kwargs)
        result = trace(module, args, kwargs)
    if result.error is None:
        return result.graphs[0]
    if isinstance(result.error, torch._dynamo.exc.TorchDynamoException):
        raise capture_error(module, result.error) from result.error
    raise result.error


def _user_frame(message: str) -> str:
    """The innermost user-code location Dynamo reports (``file:line in fn`` and the line itself)."""
    tail = message.split("from user code:")[-1]
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', tail)
    frames = [f for f in frames if "/torch/" not in f[0]] or frames
    if not frames:
        return ""
    path, line, fn, code = frames[-1]
    return f" at {path.rsplit('/', 1)[-1]}:{line} in {fn}: `{code.strip()}`"


def describe_break(e: BaseException) -> str:
    """A Dynamo error in one line: its type, first line, and the user code line it stopped at."""
    message = str(e)
    first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
    return f"{type(e).__name__}: {first}{_user_frame(message)}"


def capture_error(module: torch.nn.Module, e: Exception) -> CaptureError:
    return CaptureError(
        f"{type(module).__name__}.forward cannot be captured as one graph ({describe_break(e)}). "
        "The cachedit pass needs the whole forward in one graph; this model "
        "is not cacheable as it is (enable_cache makes submodules that break every block opaque islands; an "
        "exported package cannot hold them).")
