"""The graph path of an install: the transformer's forward compiled by the ``cachedit`` backend as one
graph, making islands of the submodules that break it inside every block until it fits; a forward that
still breaks outside the blocks compiles with graph breaks; calls with grad enabled get an uncached
compile. A break inside every block's own forward hands the model to the eager cache (eager_switch.py)."""
from __future__ import annotations

import time
import warnings

import torch
from diffusers.utils import logging as diffusers_logging

from ..backend import cachedit_backend
from ..backend.states import is_static
from ..capture import islands, regions
from ..capture.dynamo import breaks_graph, describe_break, logging_ignored, our_error, private_code, raised_by_model
from ..config import is_prune
from ..errors import ConfigError, IslandsNeeded
from ..runtime.handle import chain_lists
from .direct import DirectCalls, call_key
from .eager_switch import EagerSwitch, largest_block_list
from .modes import InstallState, Mode
from .owned import OwnedGuards

# Graphs one install may compile (one per input shape, e.g. resolution or text length, each with its own
# state) before calls with new shapes run uncached; Dynamo's default of 8 is low for serving.
MAX_GRAPHS = 64
_ISLAND_ROUNDS = 8  # one-graph compile attempts, each making the islands the last one named

# A child of diffusers' library logger: diffusers.utils.logging.set_verbosity_info() shows these lines.
logger = diffusers_logging.get_logger("diffusers.cachedit_fx")


class GraphInstall:
    """Compiles and runs the forward of one installed transformer (modes ``GRAD``, ``ONE_GRAPH``,
    ``GRAPH_BREAKS``, ``OVER_SHAPE_LIMIT``)."""

    def __init__(self, state: InstallState, eager: EagerSwitch):
        self.state, self.eager = state, eager
        self.islands: list[torch.nn.Module] = []  # submodules made opaque to Dynamo
        self.regions: list[torch.nn.Module] = []  # blocks marked as compiled regions (capture/regions.py)
        self.regions_off: str | None = None  # why the blocks compile inline, where they do
        self.static_reason: str | None = None  # why this install compiles static shapes only, where it does
        self.compiled = None  # the inference forward
        self.grad_forward = None
        self.failed: ConfigError | None = None  # a config that does not fit the model, found at the first call
        self._first_compile = False  # inside the first inference call's compile, which logs on its own
        self._dynamic_compile = False  # the graph compiling (or that failed to) has dynamic sizes
        self.owned = OwnedGuards()  # the one-graph compile's guards on the module, checked per request
        self.direct = DirectCalls()  # a request's later calls with the graph called directly (guard-light only)

    def run(self, original, args, kwargs):
        """A call after the first inference call compiled; the first of a request whose module changed
        since the guard-light compile (owned.py) compiles again."""
        if self.owned.stale(self.state.module, self.state.handle):
            logger.info("cachedit: %s changed (submodules, attributes or parameter metadata) since it was "
                        "compiled; compiling again", self.state.class_name)
            self.clear()
            return self.compile_and_run(original, args, kwargs)
        try:
            return self._call(original, args, kwargs)
        except torch._dynamo.exc.Unsupported:
            # A later recompile (new shape, grad mode) of a one-graph compile met a graph break.
            return self._run_with_breaks(original, args, kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if not self._go_static(e):  # a recompile for new sizes failed in the inner compiler
                raise
            self.clear()
            return self.compile_and_run(original, args, kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if self.state.mode is not Mode.OVER_SHAPE_LIMIT:
                self.state.mode = Mode.OVER_SHAPE_LIMIT
                warnings.warn(f"cachedit: {self.state.class_name} has compiled {MAX_GRAPHS} graphs (input shapes); "
                              "calls with further shapes run uncached (raise cachedit_fx.install.graph.MAX_GRAPHS "
                              "before enable_cache to keep more)", stacklevel=4)
            return original(*args, **kwargs)

    def _call(self, original, args, kwargs):
        """The compiled forward; guard-light, a request's later calls with a call key seen in it skip
        Dynamo's frame (direct.py)."""
        if self.state.mode is not Mode.ONE_GRAPH or not self.owned.light:
            return self.compiled(*args, **kwargs)
        key = call_key(args, kwargs)
        learned = self.direct.lookup(key, self.state.handle.requests)
        if learned is not None:
            return learned(args, kwargs)
        return self._through_dynamo(self.compiled, original, args, kwargs, key)

    def _through_dynamo(self, compiled, original, args, kwargs, key):
        """A one-graph call through Dynamo; guard-light, its direct call is learned for the request."""
        if not self.owned.light:
            return compiled(*args, **kwargs)
        return self.direct.through_dynamo(lambda: compiled(*args, **kwargs), key, self.state.handle.requests,
                                          original, args, kwargs)

    def run_with_grad(self, original, args, kwargs):
        if self.grad_forward is None:
            self.grad_forward = self._compile(original, self._backend, fullgraph=False)
            self.state.mode = Mode.GRAD
        return self.grad_forward(*args, **kwargs)

    def compile_and_run(self, original, args, kwargs):
        """The first inference call compiles the forward as ONE graph, turning submodules that break it
        inside every block into islands until it fits; a forward that still breaks (e.g. after the
        blocks) compiles with graph breaks instead. Models that fit at once are traced once. An error
        of the model's own propagates: the forward does not run a second time."""
        inner = self.state.options["inner"]
        logger.info("cachedit: compiling %s on its first call (inner %s); with Inductor this takes tens of "
                    "seconds", self.state.class_name, inner if isinstance(inner, str) else "callable")
        started = time.perf_counter()
        self._first_compile = True
        try:
            out = self._fit_one_graph(original, args, kwargs)
        finally:
            self._first_compile = False
        kinds = len({type(b) for b in self.regions})
        logger.info("cachedit: %s compiled in %.1f s (%s%s%s)", self.state.class_name, time.perf_counter() - started,
                    self.state.mode.value, f", {len(self.islands)} islands" if self.islands else "",
                    f", {len(self.regions)} blocks as {kinds} compiled regions" if self.regions else "")
        return out

    def clear(self) -> None:
        """Forget the compiled forwards (a new structure compiles again on the next call); islands stay."""
        self.state.handle.graphs.clear()
        self.compiled = self.grad_forward = self.failed = None
        self.owned.forget()
        self.direct.forget()

    def uninstall(self) -> None:
        self.clear()
        self._inline_blocks(None)
        for m in self.islands:
            islands.uninstall(m)
        self.islands.clear()

    # ------------------------------------------------------------------ regions

    def _mark_blocks(self) -> None:
        """Each block of the model's block lists as a compiled region (compiled once per block class, called
        from every block: Fn, the cond's branch, Bn), unless the blocks compile inline for a reason."""
        if self.regions_off is not None or self.islands or self.regions:
            return
        count = regions.repeated_blocks(self.state.module)
        if count < regions.MIN_BLOCKS:
            self.regions_off = f"{count} repeated blocks, fewer than {regions.MIN_BLOCKS}"  # a choice: not logged
            return
        self.regions = regions.mark(self.state.module)

    def _inline_blocks(self, reason: str | None) -> None:
        """Undo the regions: the blocks trace inline (the graph as without regions). ``reason``: why, for the
        log (None: teardown)."""
        if not self.regions:
            return
        regions.unmark(self.state.module)
        self.regions = []
        if reason is not None:
            self.regions_off = reason
            logger.info("cachedit: %s compiles its blocks inline, not as compiled regions: %s", self.state.class_name,
                        reason)

    # ------------------------------------------------------------------ compiling

    def _backend(self, gm, example_inputs):
        # A graph compiled during this call (a new shape, e.g. the uncond call's text length) runs right
        # after compiling: give its fresh state the current call's branch too, not the default -1.
        handle = self.state.handle
        before = len(handle.chains)
        started = time.perf_counter()
        self._dynamic_compile = not is_static(example_inputs)
        frame = self.direct.frame_of(gm)  # read before the passes add the states' inputs
        fn = self.direct.observe(cachedit_backend(gm, example_inputs, self.state.options), frame)
        self.state.set_hints(handle.chains[before:])
        if self.compiled is not None and not self._first_compile:
            logger.info("cachedit: compiled a graph for new input shapes of %s in %.1f s", self.state.class_name,
                        time.perf_counter() - started)
        return fn

    def _one_graph_backend(self, gm, example_inputs):
        new = islands.needed_for_graph(self.state.module, gm)
        if new:  # e.g. torch.nonzero inside every block: made opaque, then traced again
            raise IslandsNeeded({type(m) for m in new})
        return self._backend(gm, example_inputs)

    def _compile(self, original, backend, fullgraph: bool):
        # only the one-graph compile's single frame is the module's forward, its ``self`` the module
        light = self.owned.filter_for(self.state.handle) if fullgraph else None
        options = {"guard_filter_fn": light} if light is not None else None
        # Islands need static shapes (their fake kernel learns output shapes per input shape); so do DBPrune's
        # per-block states, and an install whose compile with dynamic sizes failed.
        static = self.islands or self.static_reason or is_prune(self.state.handle.cache_config)
        dynamic = False if static else self.state.dynamic
        return logging_ignored(torch.compile(private_code(original), backend=backend, dynamic=dynamic,
                                             fullgraph=fullgraph, recompile_limit=MAX_GRAPHS, options=options))

    def _go_static(self, e: Exception) -> bool:
        """Whether a failed compile is retried with static shapes: the inner compiler failed on a graph
        with dynamic sizes (Inductor's codegen of a cond's symbolic operand sizes, in torch 2.13), where
        a graph per size compiles. From then on this install compiles static shapes (logged once)."""
        if (self.static_reason is not None or self.state.dynamic is False or not self._dynamic_compile
                or not isinstance(e, torch._dynamo.exc.BackendCompilerFailed) or isinstance(our_error(e), ConfigError)):
            return False
        self.static_reason = describe_break(e)
        self.state.handle.graphs.clear()
        logger.info("cachedit: %s compiles a graph per input size: compiling with dynamic sizes failed (%s)",
                    self.state.class_name, self.static_reason)
        return True

    def _fit_one_graph(self, original, args, kwargs):
        module, state = self.state.module, self.state
        ran_eagerly, outside = False, None  # outside: a break outside the blocks, which islands cannot help
        self._mark_blocks()
        for _ in range(_ISLAND_ROUNDS):
            fn = self._compile(original, self._one_graph_backend, fullgraph=True)
            try:
                out = self._through_dynamo(fn, original, args, kwargs, call_key(args, kwargs))
            except torch._dynamo.exc.TorchDynamoException as e:
                if self._go_static(e):
                    continue
                if self.regions and not isinstance(our_error(e), ConfigError):
                    # Whatever failed (a break inside a block, a region Dynamo cannot reuse), the graph
                    # without regions decides: traced again with the blocks inline.
                    state.handle.graphs.clear()
                    self._inline_blocks(str(our_error(e) or describe_break(e)))
                    continue
                if not breaks_graph(e):
                    ours = our_error(e)  # e.g. Fn + Bn longer than the chain: the ConfigError itself
                    if isinstance(ours, ConfigError):
                        self.failed = ours  # the next calls raise it again without compiling again
                    if ours is not None:
                        raise ours from None
                    raise
                state.handle.graphs.clear()
                if raised_by_model(e):
                    break
                new = islands.needed_for_error(module, e)
                if not new and not ran_eagerly:
                    # What breaks may sit on a path taken only on the first call (diffusers' context-parallel
                    # hooks look a block's signature up once with inspect, a RoPE table built lazily): one
                    # uncached run takes it, then the forward is traced again.
                    ran_eagerly = True
                    original(*args, **kwargs)
                    continue
                if not new:
                    path = islands.breaking_block_list(module, e)
                    if path is None:
                        outside = describe_break(e)
                        break
                    self.eager.start(path, f"{describe_break(e)} breaks the graph in the own forward of every "
                                           "block, which islands cannot isolate")
                    return self.eager.run(original, args, kwargs)
                self.islands.extend(islands.install_all(new))
                continue
            self.compiled, state.mode = fn, Mode.ONE_GRAPH
            self.owned.compiled(module, state.handle)
            return out
        return self._run_with_breaks(original, args, kwargs, outside)

    def _run_with_breaks(self, original, args, kwargs, outside: str | None = None):
        """Compile with graph breaks. When a break outside the blocks (``outside``: a data-dependent
        branch or shape while preparing the inputs, inside a loop Dynamo cannot resume in) leaves the
        backbone's blocks in graphs that hold no two of them, the backbone — the largest block list —
        gets the eager cache instead, with one warning naming the break: a side list caching (a text
        refiner in the graph before the break) is not the model caching."""
        state = self.state
        self._inline_blocks("the forward compiles with graph breaks")
        self.compiled, state.mode = self._compile(original, self._backend, fullgraph=False), Mode.GRAPH_BREAKS
        out = self.compiled(*args, **kwargs)
        main = largest_block_list(state.module)
        if outside is not None and main is not None and \
                not any(main in chain_lists(c.about.name) for c in state.handle.chains):
            state.handle.graphs.clear()
            self.eager.start(main, f"{outside} breaks the graph before the block loop, which leaves the blocks "
                                   f"of {main} in graphs that hold no two of them")
        return out
