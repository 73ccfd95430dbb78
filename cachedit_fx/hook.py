"""The per-transformer install behind ``enable_cache``: a diffusers ``ModelHook`` that runs the forward
compiled by the ``cachedit`` backend.

It lives in the transformer's diffusers ``HookRegistry`` under the name ``"cachedit"``, so diffusers'
own machinery reaches it: ``cache_context("cond" / "uncond")`` tells it the CFG branch of the call in
flight, and a pipeline's end-of-call ``_reset_stateful_cache`` marks the next call as a new request.
The instance's class is never patched, so two transformers of one class keep separate state.

Modes, in the order a transformer usually goes through them:

- ``NOT_COMPILED``: nothing compiled yet.
- ``GRAD``: called with grad enabled before any inference call; an uncached compile serves those calls
  (caching is inference-only, and islands have no backward).
- ``ONE_GRAPH``: the first inference call compiled the forward as one graph, making the submodules that
  break it inside every block islands (islands.py) until it fit.
- ``GRAPH_BREAKS``: the forward still breaks outside the blocks (or a later recompile met a break):
  compiled with breaks; the graph holding the blocks is cached. When no graph holds two of the largest
  list's blocks (a break before the block loop that Dynamo cannot resume from), that list goes ``EAGER``.
- ``OVER_SHAPE_LIMIT``: ``MAX_GRAPHS`` input shapes have compiled; calls with further shapes run the
  plain forward (one warning), known shapes keep their graphs.
- ``EAGER``: the blocks' own forward breaks the graph (islands cannot isolate a block from itself), or
  ``enable_cache(..., eager=True)`` asked for it: hooks on the block list run the cache (eager.py), one
  warning naming the cause.
"""
from __future__ import annotations

import collections
import enum
import inspect
import time
import warnings
import weakref

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils import logging as diffusers_logging

from . import islands, parallel
from .backend import cachedit_backend, parse_options
from .capture import breaks_graph, describe_break, logging_ignored, our_error, private_code, raised_by_model
from .config import DBCacheConfig, SeparateCFG, TaylorSeerCalibratorConfig
from .eager import EagerCache, call_inputs
from .errors import ConfigError, IslandsNeeded, NoCacheableChain
from .handle import CacheHandle, chain_lists
from .offload import offload_hooks
from .passes import PinnedList

HOOK_NAME = "cachedit"
# Graphs one install may compile (one per input shape, e.g. resolution or text length, each with its own
# state) before calls with new shapes run uncached; Dynamo's default of 8 is low for serving.
MAX_GRAPHS = 64
# A float argument with this many values in twice as many calls is a timestep (CFG pairs repeat it).
_FLOAT_WINDOW = 3
_ISLAND_ROUNDS = 8  # one-graph compile attempts, each making the islands the last one named

# A child of diffusers' library logger: diffusers.utils.logging.set_verbosity_info() shows these lines.
logger = diffusers_logging.get_logger("diffusers.cachedit_fx")


class Mode(enum.Enum):
    NOT_COMPILED = "not compiled yet"
    GRAD = "grad-mode path (uncached)"
    ONE_GRAPH = "one graph"
    GRAPH_BREAKS = "graph breaks"
    OVER_SHAPE_LIMIT = "over the shape limit"
    EAGER = "eager cache (block hooks, decisions on the host)"
    UNCACHED = "uncached (a warning said why)"


class _CallContext(StateManager):
    """Where diffusers' ``cache_context(name, ...)`` lands: diffusers sets the context of the call in
    flight on every ``StateManager`` of a stateful hook, and clears it after the call."""

    def __init__(self):
        super().__init__(BaseState)
        self.current = None

    def set_context(self, context) -> None:
        self.current = context


class CacheHook(ModelHook):
    """Caches one transformer; see the module docstring for its modes."""

    _is_stateful = True

    def __init__(self, cache_config: DBCacheConfig, calibrator_config: TaylorSeerCalibratorConfig | None,
                 separate_cfg: SeparateCFG, inner="inductor", pinned: tuple[PinnedList, ...] = (),
                 eager: bool = False):
        super().__init__()
        self.handle = CacheHandle(cache_config, calibrator_config, islands_checked=True)
        self.separate_cfg = separate_cfg
        self.options = dict(cache_config=cache_config, calibrator_config=calibrator_config, inner=inner,
                            separate_cfg=separate_cfg, handle=self.handle, blocks=pinned)
        parse_options(self.options)  # fail now, not at the first call
        self.context = _CallContext()
        self.mode = Mode.NOT_COMPILED
        self.islands: list[torch.nn.Module] = []  # submodules made opaque to Dynamo (islands.py)
        self._compiled = None  # the inference forward (ONE_GRAPH / GRAPH_BREAKS / OVER_SHAPE_LIMIT)
        self._grad_forward = None
        self._branch: int | None = None  # the CFG branch of the call in flight, when the caller names it
        self._new_request = False  # diffusers' reset_state: the next call starts a new request
        self._first_compile = False  # inside the first inference call's compile, which logs on its own
        self._pinned, self._want_eager = pinned, eager
        self._failed: ConfigError | None = None  # a config that does not fit the model, found at the first call
        self._eager: EagerCache | None = None
        self._module = None
        self._floats: dict = {}  # the last calls' values of each Python float argument
        self._calls = 0
        self.handle.held = []  # the first calls' compile warnings wait until no float timestep shows

    # ------------------------------------------------------------------ ModelHook

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        cache = self.handle.cache_config
        blocks = sum(len(m) for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 2)
        if cache.Fn_compute_blocks + cache.Bn_compute_blocks > blocks:  # no chain can be longer than all lists
            raise ConfigError(f"Fn_compute_blocks={cache.Fn_compute_blocks}, Bn_compute_blocks={cache.Bn_compute_blocks}: "
                              f"{type(module).__name__} has {blocks} blocks in all its block lists; need "
                              f"Fn + Bn <= the chain's length")
        self._module = weakref.ref(module)
        self._had_instance_forward = "forward" in module.__dict__
        return module

    # A torch.compile around an installed transformer (cache-dit's docs compile after enable_cache) would
    # trace this and the compile inside it: it runs as a call of its own instead, caching as without the
    # outer compile; with fullgraph=True, Dynamo's error quotes this reason.
    @torch.compiler.disable(reason="cachedit: enable_cache compiles the transformer itself (compile=True, the "
                                   "default, uses Inductor); call it without an outer torch.compile")
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self._failed is not None:
            raise self._failed
        if self._new_request:
            self.reset()
        self._branch = self._branch_of_call()
        self._set_hints(self.handle.chains)
        if self.mode is Mode.EAGER:
            return self._run_eager(args, kwargs)
        if self.mode is Mode.UNCACHED:
            return self._original(*args, **kwargs)
        if self._float_timestep(args, kwargs):
            return self._original(*args, **kwargs)
        self._calls += 1
        if self._calls == _FLOAT_WINDOW:  # no float timestep showed: what the compile found may be said
            self.handle.release_warnings()
        if self.mode in (Mode.NOT_COMPILED, Mode.GRAD):
            if self._want_eager:
                self._start_eager(None, None)
                return self._run_eager(args, kwargs)
            if torch.is_grad_enabled():
                return self._run_with_grad(args, kwargs)
            offloaded = offload_hooks(self._module())
            if offloaded is not None:
                self._start_eager(None, f"{offloaded} move weights in every block call, which a compiled graph "
                                        "cannot hold (cached steps skip the middle blocks' calls and their onload)")
                return self._run_eager(args, kwargs)
            return self._compile_and_run(args, kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported:
            # A later recompile (new shape, grad mode) of a one-graph compile met a graph break.
            return self._run_with_breaks(args, kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if self.mode is not Mode.OVER_SHAPE_LIMIT:
                self.mode = Mode.OVER_SHAPE_LIMIT
                warnings.warn(f"cachedit: {type(module).__name__} has compiled {MAX_GRAPHS} graphs (input shapes); "
                              "calls with further shapes run uncached (raise cachedit_fx.hook.MAX_GRAPHS before "
                              "enable_cache to keep more)", stacklevel=2)
            return self._original(*args, **kwargs)

    def _float_timestep(self, args, kwargs) -> bool:
        """Whether a Python float argument changes call by call (a float timestep): the compiler makes
        one graph per value, each with its own state, so nothing would cache and requests could not be
        told apart. Switches to uncached with one warning. A float that changes per request keeps
        caching."""
        for k, v in (*enumerate(args), *kwargs.items()):
            if not isinstance(v, float):
                continue
            seen = self._floats.setdefault(k, collections.deque(maxlen=2 * _FLOAT_WINDOW))
            seen.append(v)
            if len(set(seen)) >= _FLOAT_WINDOW:
                self.handle.release_warnings(drop=True)  # e.g. "no timestep": this is why
                self.handle.warn_once("float argument", f"cachedit: {self._class_name} takes a Python float "
                                      f"({self._parameter_name(k)}) that changes call by call; the compiler "
                                      "specialises on its value (a graph per value), so nothing would cache. Running "
                                      "uncached: pass it as a tensor, e.g. torch.tensor([t])", stacklevel=4)
                self.mode = Mode.UNCACHED
                return True
        return False

    def _parameter_name(self, key) -> str:
        """A call argument's name: keyword arguments by theirs, positional ones by the forward's signature."""
        if isinstance(key, str):
            return repr(key)
        params = list(inspect.signature(self._original).parameters)
        return repr(params[key]) if key < len(params) else f"argument {key}"

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """diffusers calls this at the end of every pipeline call: the next call starts a new request.
        The state is cleared then, not now, so ``summary()`` still reads the request that just ended."""
        self._new_request = True
        return module

    # ------------------------------------------------------------------ ours

    def reset(self) -> None:
        """Start a new request now: clear counters, references and logs."""
        self._new_request = False
        self.handle.reset()

    def reconfigure(self, cache_config: DBCacheConfig, calibrator_config: TaylorSeerCalibratorConfig | None) -> None:
        """A new structure (Fn/Bn, calibrator ...): the next call compiles again; the islands stay."""
        options = dict(self.options, cache_config=cache_config, calibrator_config=calibrator_config)
        parse_options(options)
        self.options = options
        self.handle.graphs.clear()
        self.handle.cache_config, self.handle.calibrator_config = cache_config, calibrator_config
        self._compiled = self._grad_forward = self._failed = None
        if self._eager is not None:
            path = self._eager.path
            self._eager.uninstall()
            self._start_eager(path, None)
        else:
            self.mode = Mode.NOT_COMPILED

    def uninstall(self, module: torch.nn.Module) -> None:
        """Take the hook off ``module`` and undo the islands; the module runs as it did before."""
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)
        restored = module.__dict__.get("forward")
        if not self._had_instance_forward and getattr(restored, "__self__", None) is module and \
                getattr(restored, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]  # the registry put the bound method back as an attribute
        self.handle.graphs.clear()
        for m in self.islands:
            islands.uninstall(m)
        self.islands.clear()
        if self._eager is not None:
            self._eager.uninstall()
            self._eager = None
        self._compiled = self._grad_forward = None
        self.mode = Mode.NOT_COMPILED

    @property
    def _original(self):
        return self.fn_ref.original_forward

    def _branch_of_call(self) -> int | None:
        # diffusers' cache_context("cond"/"uncond") names the branch; without it (Chroma, Lumina2, a bare
        # transformer) the graph tells a CFG pair's second call on device by its repeated timestep.
        context = self.context.current
        if context is None or self.separate_cfg is SeparateCFG.OFF:
            return None
        branch = {"cond": 0, "uncond": 1}.get(context.name)
        if branch is not None and self.handle.cache_config.cfg_compute_first:
            branch = 1 - branch
        return branch

    def _set_hints(self, chains) -> None:
        for chain in chains:
            chain.state.tensors["branch_hint"].fill_(-1 if self._branch is None else self._branch)

    def _backend(self, gm, example_inputs):
        # A graph compiled during this call (a new shape, e.g. the uncond call's text length) runs right
        # after compiling: give its fresh state the current call's branch too, not the default -1.
        before = len(self.handle.chains)
        started = time.perf_counter()
        fn = cachedit_backend(gm, example_inputs, self.options)
        self._set_hints(self.handle.chains[before:])
        if self._compiled is not None and not self._first_compile:
            logger.info("cachedit: compiled a graph for new input shapes of %s in %.1f s", self._class_name,
                        time.perf_counter() - started)
        return fn

    def _one_graph_backend(self, gm, example_inputs):
        new = islands.needed_for_graph(self._module(), gm)
        if new:  # e.g. torch.nonzero inside every block: made opaque, then traced again
            raise IslandsNeeded({type(m) for m in new})
        return self._backend(gm, example_inputs)

    @property
    def _class_name(self) -> str:
        return type(self._module()).__name__

    def _compile(self, backend, fullgraph: bool):
        return logging_ignored(torch.compile(private_code(self._original), backend=backend, dynamic=False,
                                             fullgraph=fullgraph, recompile_limit=MAX_GRAPHS))

    def _run_with_grad(self, args, kwargs):
        if self._grad_forward is None:
            self._grad_forward = self._compile(self._backend, fullgraph=False)
            self.mode = Mode.GRAD
        return self._grad_forward(*args, **kwargs)

    def _compile_and_run(self, args, kwargs):
        """The first inference call compiles the forward as ONE graph, turning submodules that break it
        inside every block into islands until it fits; a forward that still breaks (e.g. after the
        blocks) compiles with graph breaks instead. Models that fit at once are traced once. An error
        of the model's own propagates: the forward does not run a second time."""
        inner = self.options["inner"]
        logger.info("cachedit: compiling %s on its first call (inner %s); with Inductor this takes tens of "
                    "seconds", self._class_name, inner if isinstance(inner, str) else "callable")
        started = time.perf_counter()
        self._first_compile = True
        try:
            out = self._fit_one_graph(self._module(), args, kwargs)
        finally:
            self._first_compile = False
        logger.info("cachedit: %s compiled in %.1f s (%s%s)", self._class_name, time.perf_counter() - started,
                    self.mode.value, f", {len(self.islands)} islands" if self.islands else "")
        return out

    def _fit_one_graph(self, module, args, kwargs):
        ran_eagerly, outside = False, None  # outside: a break outside the blocks, which islands cannot help
        for _ in range(_ISLAND_ROUNDS):
            fn = self._compile(self._one_graph_backend, fullgraph=True)
            try:
                out = fn(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                if not breaks_graph(e):
                    ours = our_error(e)  # e.g. Fn + Bn longer than the chain: the ConfigError itself
                    if isinstance(ours, ConfigError):
                        self._failed = ours  # the next calls raise it again without compiling again
                    if ours is not None:
                        raise ours from None
                    raise
                self.handle.graphs.clear()
                if raised_by_model(e):
                    break
                new = islands.needed_for_error(module, e)
                if not new and not ran_eagerly:
                    # What breaks may sit on a path taken only on the first call (diffusers' context-parallel
                    # hooks look a block's signature up once with inspect, a RoPE table built lazily): one
                    # uncached run takes it, then the forward is traced again.
                    ran_eagerly = True
                    self._original(*args, **kwargs)
                    continue
                if not new:
                    path = islands.breaking_block_list(module, e)
                    if path is None:
                        outside = describe_break(e)
                        break
                    self._start_eager(path, f"{describe_break(e)} breaks the graph in the own forward of "
                                            "every block, which islands cannot isolate")
                    return self._run_eager(args, kwargs)
                self.islands.extend(islands.install_all(new))
                continue
            self._compiled, self.mode = fn, Mode.ONE_GRAPH
            return out
        return self._run_with_breaks(args, kwargs, outside)

    def _start_eager(self, path: str | None, reason: str | None) -> None:
        """Cache the block list at ``path`` (the pinned one, else the largest) eagerly from now on."""
        module = self._module()
        if len(self._pinned) > 1:
            raise ConfigError(f"the eager cache caches one block list; the BlockAdapter names "
                              f"{[p.path for p in self._pinned]}: pin one")
        pattern = self._pinned[0].pattern if self._pinned else None
        path = path or (self._pinned[0].path if self._pinned else _largest_block_list(module))
        if path is None:
            raise ConfigError(f"{type(module).__name__} has no ModuleList of two or more blocks to cache eagerly")
        group = parallel.model_group(module)
        if group is not None:
            parallel.check_same_config(group, self.handle.cache_config, self.handle.calibrator_config)
        try:
            self._eager = EagerCache(module.get_submodule(path), path, self.handle, self.separate_cfg, pattern,
                                     group)
        except NoCacheableChain as e:
            self.mode = Mode.UNCACHED
            warnings.warn(f"cachedit: {type(module).__name__} runs uncached: {e}", stacklevel=4)
            return
        self.mode = Mode.EAGER
        if reason is not None:
            warnings.warn(f"cachedit: {type(module).__name__} runs the eager cache on {path} (block hooks, decisions "
                          f"on the host, blocks uncompiled): {reason}", stacklevel=4)

    def _run_eager(self, args, kwargs):
        if self._eager is None or torch.is_grad_enabled():  # uncached, or caching is inference-only
            return self._original(*args, **kwargs)
        self._eager.begin(*call_inputs(self._original, args, kwargs))
        try:
            return self._original(*args, **kwargs)
        finally:
            self._eager.end()

    def _run_with_breaks(self, args, kwargs, outside: str | None = None):
        """Compile with graph breaks. When a break outside the blocks (``outside``: a data-dependent
        branch or shape while preparing the inputs, inside a loop Dynamo cannot resume in) leaves the
        backbone's blocks in graphs that hold no two of them, the backbone — the largest block list —
        gets the eager cache instead, with one warning naming the break: a side list caching (a text
        refiner in the graph before the break) is not the model caching."""
        self._compiled, self.mode = self._compile(self._backend, fullgraph=False), Mode.GRAPH_BREAKS
        out = self._compiled(*args, **kwargs)
        main = _largest_block_list(self._module())
        if outside is not None and main is not None and not any(main in chain_lists(c.about.name) for c in self.handle.chains):
            self.handle.graphs.clear()
            self._start_eager(main, f"{outside} breaks the graph before the block loop, which leaves the blocks "
                                    f"of {main} in graphs that hold no two of them")
        return out


def _largest_block_list(module: torch.nn.Module) -> str | None:
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in module.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) >= 2]
    return max(lists)[1] if lists else None


def install(module: torch.nn.Module, hook: CacheHook) -> CacheHook:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
    return hook


def cache_hook(module: torch.nn.Module) -> CacheHook | None:
    """The hook enable_cache installed on ``module``, if any."""
    registry = module.__dict__.get("_diffusers_hook")
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook if isinstance(hook, CacheHook) else None
