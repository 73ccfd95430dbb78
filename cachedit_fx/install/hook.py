"""The per-transformer install behind ``enable_cache``: a diffusers ``ModelHook`` that routes each call
by the install's mode (modes.py) to the graph path (graph.py), the eager cache (eager_switch.py) or the
plain forward.

It lives in the transformer's diffusers ``HookRegistry`` under the name ``"cachedit"``, so diffusers'
own machinery reaches it: ``cache_context("cond" / "uncond")`` tells it the CFG branch of the call in
flight, a pipeline's end-of-call ``_reset_stateful_cache`` marks the next call as a new request, and
``registry.remove_hook("cachedit")`` (what ``disable_cache`` calls) tears everything down in
:meth:`CacheHook.deinitalize_hook`. The instance's class is never patched, so two transformers of one
class keep separate state. The hook's handle owns the one copy of the configs.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..backend import parse_options
from ..config import CacheType, DBCacheConfig, PinnedList, TaylorSeerCalibratorConfig, is_prune, separate_cfg_mode
from ..capture.dynamo import describe_break
from ..errors import CacheditError, ConfigError
from ..runtime.handle import CacheHandle
from .calls import FLOAT_WINDOW, FloatArguments, FloatTimestep, branch_of_call, parameter_name
from .eager_switch import EagerSwitch
from .graph import GraphInstall
from .modes import InstallState, Mode
from .offload import offload_hooks

HOOK_NAME = "cachedit"


class _CallContext(StateManager):
    """Where diffusers' ``cache_context(name, ...)`` lands: diffusers sets the context of the call in
    flight on every ``StateManager`` of a stateful hook, and clears it after the call."""

    def __init__(self):
        super().__init__(BaseState)
        self.current = None

    def set_context(self, context) -> None:
        self.current = context


class CacheHook(ModelHook):
    """Caches one transformer; see modes.py for its modes."""

    _is_stateful = True

    def __init__(self, cache_config: DBCacheConfig, calibrator_config: TaylorSeerCalibratorConfig | None,
                 inner="inductor", pinned: tuple[PinnedList, ...] = (), eager: bool = False, on_pipeline: bool = False,
                 separate_hint: bool = False, dynamic: bool | None = None, background_compile: bool = False):
        """``on_pipeline``: the transformer of a pipeline (diffusers' ``cache_context`` names CFG branches);
        ``separate_hint``: a BlockAdapter says the pipeline runs separate CFG (where the config says None);
        ``dynamic``: torch.compile's, ``background_compile``: the backend's (see ``enable_cache``)."""
        super().__init__()
        self.handle = CacheHandle(cache_config, calibrator_config, islands_checked=True)
        self._inner, self._pinned, self._background = inner, pinned, background_compile
        self._on_pipeline, self._separate_hint = on_pipeline, separate_hint
        self.state = InstallState(self.handle, self._backend_options(), dynamic=dynamic)  # fails now, not later
        self.context = _CallContext()
        self.eager = EagerSwitch(self.state, pinned)
        self.graph = GraphInstall(self.state, self.eager)
        self._want_eager = eager
        self._new_request = False  # diffusers' reset_state: the next call starts a new request
        self._floats = FloatArguments()
        self._float_timestep = FloatTimestep()
        self._calls = 0
        self.handle.held = []  # the first calls' compile warnings wait until no float timestep shows

    def _backend_options(self) -> dict:
        """The backend options of the handle's configs, checked. None (detect) and, for pipelines, True:
        two state sets, the branch named by cache_context or found on device; True on a bare
        transformer: calls alternate, as cache-dit does."""
        separate = self.handle.cache_config.enable_separate_cfg
        if separate is None and self._separate_hint:
            separate = True
        options = dict(handle=self.handle, inner=self._inner, blocks=self._pinned, background_compile=self._background,
                       separate_cfg=separate_cfg_mode(separate, "enable_separate_cfg", self._on_pipeline))
        parse_options(options)
        return options

    @property
    def mode(self) -> Mode:
        return self.state.mode

    @property
    def islands(self) -> list[torch.nn.Module]:
        return self.graph.islands

    # ------------------------------------------------------------------ ModelHook

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        cache = self.handle.cache_config
        blocks = sum(len(m) for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 2)
        # No chain can be longer than all lists (DBPrune, as cache-dit, prunes nothing then: one warning).
        if cache.Fn_compute_blocks + cache.Bn_compute_blocks > blocks and not is_prune(cache):
            raise ConfigError(f"Fn_compute_blocks={cache.Fn_compute_blocks}, Bn_compute_blocks={cache.Bn_compute_blocks}: "
                              f"{type(module).__name__} has {blocks} blocks in all its block lists; need "
                              f"Fn + Bn <= the chain's length")
        self.state.module_ref = weakref.ref(module)
        self._had_instance_forward = "forward" in module.__dict__
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """diffusers calls this from ``remove_hook`` after putting the previous forward back: undo the
        islands and the eager wrappers, drop the compiled graphs; the module runs exactly as before."""
        restored = module.__dict__.get("forward")
        if not self._had_instance_forward and getattr(restored, "__self__", None) is module and \
                getattr(restored, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]  # the registry put the bound method back as an attribute
        self.graph.uninstall()
        self.eager.stop()
        self.state.mode = Mode.NOT_COMPILED
        return module

    # A torch.compile around an installed transformer (cache-dit's docs compile after enable_cache) would
    # trace this and the compile inside it: it runs as a call of its own instead, caching as without the
    # outer compile; with fullgraph=True, Dynamo's error quotes this reason.
    @torch.compiler.disable(reason="cachedit: enable_cache compiles the transformer itself (compile=True, the "
                                   "default, uses Inductor); call it without an outer torch.compile")
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.graph.failed is not None:
            raise self.graph.failed
        if self._new_request:
            self.reset()
        cache = self.handle.cache_config
        self.state.branch = branch_of_call(self.context.current, self.state.options["separate_cfg"],
                                           cache.cfg_compute_first)
        self.state.set_hints(self.handle.chains)
        original = self.fn_ref.original_forward
        converted = self._float_timestep.convert(original, args, kwargs)
        if converted is not None:
            return self._run_float_timestep(module, original, args, kwargs, *converted)
        return self._route(module, original, args, kwargs)

    def _route(self, module, original, args, kwargs):
        """One call by the install's mode."""
        mode = self.state.mode
        if mode is Mode.EAGER:
            return self.eager.run(original, args, kwargs)
        if mode is Mode.UNCACHED or self._changing_float(original, args, kwargs):
            return original(*args, **kwargs)
        self._calls += 1
        if self._calls == FLOAT_WINDOW and not self._float_timestep.on_probation:
            self.handle.release_warnings()  # no float timestep showed: what the compile found may be said
        if mode in (Mode.NOT_COMPILED, Mode.GRAD):
            return self._first_inference_call(module, original, args, kwargs)
        return self.graph.run(original, args, kwargs)

    def _run_float_timestep(self, module, original, args, kwargs, t_args, t_kwargs, name: str):
        """A call whose float timestep ``name`` is passed as a tensor. Where the forward needs the float
        itself (math.* on it, int() / round(), a Python branch on its value, a fill value), the compile
        fails or compiles a new graph for inputs it has seen, one per value: the call then runs on the
        float, and the model uncached from now on, with one warning naming it. Until a call with inputs
        seen before compiles nothing new, the calls' warnings wait (they may follow from this)."""
        before = {id(g) for g in self.handle.graphs}
        seen = self._float_timestep.repeats_inputs(t_args, t_kwargs)
        proven = self._float_timestep.proven
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) if not proven else contextlib.nullcontext() as caught:
                if not proven:
                    warnings.simplefilter("always")
                out = self._route(module, original, t_args, t_kwargs)
        except CacheditError:
            self._hold(caught or [])
            raise
        except Exception as e:  # noqa: BLE001 - the float runs the call; the model's own error raises there
            out = original(*args, **kwargs)
            self._drop_float_timestep(name, describe_break(e))
            return out
        if seen and self.state.mode not in (Mode.EAGER, Mode.UNCACHED) and \
                any(id(g) not in before for g in self.handle.graphs):
            self._drop_float_timestep(name, "a new graph for each value")
            return out
        self._hold(caught or [])
        if not proven and (seen or self.state.mode is Mode.EAGER):
            self._float_timestep.proven = True
            self.handle.release_warnings()
        return out

    def _hold(self, caught) -> None:
        """Warnings recorded during a call: held with the install's (see CacheHandle.held), or issued."""
        for w in caught:
            if self.handle.held is not None:
                self.handle.held.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _drop_float_timestep(self, name: str, cause: str) -> None:
        self._float_timestep.dropped = True
        self.graph.clear()
        self.eager.stop()
        self.state.mode = Mode.UNCACHED
        self.handle.release_warnings(drop=True)  # what the compile said follows from this
        cls = self.state.class_name
        self.handle.warn_once("float argument", f"cachedit: {cls}.forward takes {name!r} as a Python float; "
                              "enable_cache passed it as a 0-dim float32 tensor so that one graph serves every "
                              f"value, but forward uses it where a tensor cannot stand in for a float ({cause}: "
                              "math.* on it, int() / round(), a Python `if` on its value, torch.as_tensor or "
                              f"a fill value). {cls} runs uncached from now on. To cache it, compute from a "
                              "tensor inside forward (torch.* instead of math.*, no Python branch on its value) "
                              f"or pass {name} as a tensor, e.g. torch.full((batch,), t)", stacklevel=6)

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
        """A new structure (Fn/Bn, CFG layout, calibrator ...): the next call compiles again (the islands
        stay); ``CacheType.NONE`` runs the model uncached until a config caches again."""
        old = self.handle.cache_config, self.handle.calibrator_config
        self.handle.cache_config, self.handle.calibrator_config = cache_config, calibrator_config
        try:
            self.state.options = self._backend_options()
        except ConfigError:
            self.handle.cache_config, self.handle.calibrator_config = old
            raise
        self.graph.clear()
        if cache_config.cache_type is CacheType.NONE:
            self.eager.stop()
            self.state.mode = Mode.UNCACHED
        elif self.eager.cache is not None:
            self.eager.restart()
        else:
            self.state.mode = Mode.NOT_COMPILED

    def _first_inference_call(self, module, original, args, kwargs):
        if self._want_eager:
            self.eager.start(None, None)
            return self.eager.run(original, args, kwargs)
        if torch.is_grad_enabled():
            return self.graph.run_with_grad(original, args, kwargs)
        offloaded = offload_hooks(module)
        if offloaded is not None:
            self.eager.start(None, f"{offloaded} move weights in every block call, which a compiled graph cannot "
                                   "hold (cached steps skip the middle blocks' calls and their onload)")
            return self.eager.run(original, args, kwargs)
        return self.graph.compile_and_run(original, args, kwargs)

    def _changing_float(self, original, args, kwargs) -> bool:
        """Whether a Python float argument changes call by call (a float timestep): the compiler makes
        one graph per value, each with its own state, so nothing would cache and requests could not be
        told apart. Switches to uncached with one warning. A float that changes per request keeps
        caching."""
        key = self._floats.changing(args, kwargs)
        if key is None:
            return False
        self.handle.release_warnings(drop=True)  # e.g. "no timestep": this is why
        self.handle.warn_once("float argument", f"cachedit: {self.state.class_name} takes a Python float "
                              f"({parameter_name(original, key)}) that changes call by call; the compiler "
                              "specialises on its value (a graph per value), so nothing would cache. Running "
                              "uncached: pass it as a tensor, e.g. torch.tensor([t])", stacklevel=5)
        self.state.mode = Mode.UNCACHED
        return True


def install(module: torch.nn.Module, hook: CacheHook) -> CacheHook:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
    return hook


def uninstall(module: torch.nn.Module) -> None:
    """Take the cachedit hook off ``module`` through diffusers' registry (deinitalize_hook tears down)."""
    HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)


def cache_hook(module: torch.nn.Module) -> CacheHook | None:
    """The hook enable_cache installed on ``module``, if any."""
    registry = module.__dict__.get("_diffusers_hook")
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook if isinstance(hook, CacheHook) else None
