"""Methods side by side (peers.py, gpu.py): each method as a ``Variant``, whole requests timed interleaved,
single calls at a fixed state, the ratio rows, and the few-step schedule of distilled models."""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time

import torch

from _common import FBC, cachedit, cfg, compile_own, time_interleaved

INSTALL = "pip install --no-deps cache-dit==1.5.3 pyyaml accelerate"

# The scheduler Qwen-Image-Lightning's 4- and 8-step distilled models sample with (cache-dit 1.5.3 ships it
# in cache_dit/_utils/examples.py, `_qwen_light_scheduler`): flow matching, time shift 3, exponential.
DISTILLED_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
# cache-dit's own cache limits for that 8-step model (the same example's `_qwen_light_cache_config`): 4
# warmup steps, at most 2 cached steps, never 2 in a row.
DISTILLED_LIMITS = {"max_cached_steps": 2, "max_continuous_cached_steps": 1}
DISTILLED_WARMUP = 4


class Variant:
    """One method in a comparison: ``call`` stands in for the transformer, ``reset`` starts a request,
    ``cached()`` the last request's cached step indices (None where only a count is known: ``count()``);
    ``configure(threshold, warmup=0, **limits)`` (where the method takes new numbers without a recompile)
    sets them for the next requests and starts afresh: threshold 0 computes every step, 1e9 with no
    warmup caches every step after the first (the per-step tables)."""

    def __init__(self, call, reset=None, cached=None, count=None, configure=None):
        self.call, self.reset = call, reset or (lambda: None)
        self.cached = cached or (lambda: None)
        self.count = count or (lambda: len(self.cached() or []))
        self.configure = configure


def handle_variant(call, handle) -> Variant:
    """A cachedit-fx ``call`` whose ``handle`` holds its state: new numbers through ``handle.configure``."""
    from cachedit_fx.runtime.stats import collect

    def cached():
        chains = collect(handle)
        return [i for i, c in enumerate(chains[0].cached) if c] if chains else []

    def configure(threshold, warmup=0, **limits):
        handle.configure(cfg(threshold, warmup, **limits))
        handle.reset()

    return Variant(call, handle.reset, cached, configure=configure)


def cachedit_variant(model, inner: str, clone=copy.deepcopy) -> tuple[Variant, object]:
    """(variant, handle): cachedit-fx through ``enable_cache`` on a copy of ``model``, threshold 0 until
    configured."""
    m, handle = cachedit(model, inner, clone)
    return handle_variant(m, handle), handle


def fbc_variant(model, inner: str, clone=copy.deepcopy) -> Variant:
    """diffusers FirstBlockCache under torch.compile (``inner``), computing every step until configured
    (with the threshold alone: it has no warmup and no limits, so it matches the others' decisions only
    where they run none)."""
    fbc = FBC(model, 0.0, compile_backend=inner, clone=clone)
    fbc.configure(0.0)

    def configure(threshold, warmup=0, **limits):  # no warmup, no limits: the threshold alone
        fbc.configure(threshold)

    return Variant(fbc, fbc.reset, fbc.cached_list, configure=configure)


def cache_dit_lib():
    """cache-dit 1.5.3 with its logging quiet and its Dynamo settings, or None where it is not installed."""
    try:
        import cache_dit
    except ImportError:
        return None
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # cache-dit's recommended compile setup, Dynamo part only (recompile limits raised): descent_tuning=True
    # would also change global Inductor options, i.e. the plain and cachedit-fx compiles in this process.
    cache_dit.set_compile_configs(descent_tuning=False)
    return cache_dit


def cache_dit_variant(lib, model, inner, regional, clone=copy.deepcopy) -> Variant:
    """cache-dit's DBCache (F1B0, no separate CFG) on a copy of ``model``, with torch.compile of the whole
    transformer or regional compile (diffusers' compile_repeated_blocks); threshold 0 until configured."""
    m = clone(model)
    numbers = {"threshold": 0.0, "warmup": 4, "limits": {}}

    def config():
        return lib.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=numbers["threshold"],
                                 max_warmup_steps=numbers["warmup"], enable_separate_cfg=False, **numbers["limits"])

    lib.enable_cache(m, cache_config=config())
    if regional:  # compiles each block in place; the cache-dit wrappers around them stay eager
        m.compile_repeated_blocks(backend=inner, dynamic=False)
        call = m
    else:
        call = compile_own(m, inner)

    def cached():
        return list(m._context_manager.get_context(m._context_names[-1]).cached_steps)

    def configure(threshold, warmup=0, **limits):
        numbers.update(threshold=threshold, warmup=warmup, limits=limits)
        lib.refresh_context(m, cache_config=config())

    return Variant(call, lambda: lib.refresh_context(m, cache_config=config()), cached, configure=configure)


def graph_counts():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def first_requests(variants: dict, request, sync=None) -> tuple[dict, dict]:
    """One request per variant, one after another (the first compiles): ({name: seconds}, {name: [graphs,
    graph breaks] Dynamo made meanwhile})."""
    sync = sync or (lambda: None)
    first_s, graphs = {}, {}
    for name, v in variants.items():
        g0 = graph_counts()
        v.reset()
        sync()
        t0 = time.perf_counter()
        request(v.call)
        sync()
        first_s[name] = time.perf_counter() - t0
        graphs[name] = [a - b for a, b in zip(graph_counts(), g0)]
    return first_s, graphs


def interleaved_requests(variants: dict, request, reps: int, sync=None) -> tuple[dict, dict]:
    """``reps`` rounds of one request per variant in turn (A B C A B C ...: load drift hits all alike):
    ({name: [seconds]}, {name: [(cached step list or None, cached count)]})."""
    sync = sync or (lambda: None)
    timings, cached = {k: [] for k in variants}, {k: [] for k in variants}
    for _ in range(reps):
        for name, v in variants.items():
            v.reset()
            sync()
            t0 = time.perf_counter()
            request(v.call)
            sync()
            timings[name].append(time.perf_counter() - t0)
            cached[name].append((v.cached(), v.count()))
    return timings, cached


def decision_mismatches(cached: dict, expected: list, names) -> list[str]:
    """What differs from ``expected`` (the cached step list every one of ``names`` must take, in every
    request) and between the requests of every variant; empty when all agree."""
    bad = [f"{k}: decisions differ between requests: {runs}" for k, runs in cached.items()
           if any(r != runs[0] for r in runs)]
    bad += [f"{k}: cached steps {cached[k][0][0]}, expected {list(expected)}" for k in names
            if cached[k][0][0] != list(expected)]
    return bad


def request_rows(timings: dict, counts: dict, steps: int, plain: str, fn_only: str, ideal_n: int) -> list[dict]:
    """One row per method (median and min request seconds, speedups, efficiency vs ideal, implied cached
    step) and the ideal row at ``ideal_n`` cached steps. ``counts``: cached steps per method (the
    Fn-only model runs every step Fn only). ideal(n) = ((steps - n) x plain step + n x Fn-only step)."""
    med = {k: statistics.median(v) for k, v in timings.items()}
    low = {k: min(v) for k, v in timings.items()}

    def ideal(n, t):
        return ((steps - n) * t[plain] + n * t[fn_only]) / steps

    def implied(n, k):  # what each cached step cost, if its computed steps cost a plain step
        if k == fn_only:
            return 1e3 * med[fn_only] / steps
        return 1e3 * (med[k] - (steps - n) * med[plain] / steps) / n if n else ""

    rows = []
    for k in timings:
        n = counts[k] if k != fn_only else steps
        rows.append({"method": k, "cached steps": f"{n}/{steps}" if k != fn_only else "(all Fn only)",
                     "median s": med[k], "min s": low[k], "speedup vs plain (median)": med[plain] / med[k],
                     "speedup (min)": low[plain] / low[k],
                     "efficiency vs ideal": ideal(n, med) / med[k] if k != fn_only else "",
                     "implied cached step ms": implied(n, k)})
    rows.append({"method": f"ideal (computed x plain step + cached x Fn-only step, {ideal_n} cached)",
                 "cached steps": f"{ideal_n}/{steps}", "median s": ideal(ideal_n, med), "min s": ideal(ideal_n, low),
                 "speedup vs plain (median)": med[plain] / ideal(ideal_n, med),
                 "speedup (min)": low[plain] / ideal(ideal_n, low), "efficiency vs ideal": 1.0})
    return rows


def per_step(variants: dict, inputs: dict, plain: str, fn_only: str, reps: int, per: int, sync=None) -> dict:
    """Single calls at a fixed state, interleaved: each configurable method's computed step (threshold 0)
    and cached step (threshold 1e9, no warmup, after one computing call), the plain step and the Fn-only
    step; {name: {state: {median_ms, min_ms}}}. Asserts each method held its state."""
    out = {}
    for state, thr in (("computed", 0.0), ("cached", 1e9)):
        fns = {}
        for k, v in variants.items():
            if v.configure is not None:
                v.configure(thr)
                v.call(**inputs)  # the first call after a fresh start computes
            if v.configure is not None or k == (plain if state == "computed" else fn_only):
                fns[k] = lambda v=v: v.call(**inputs)
        for k, r in time_interleaved(fns, reps, per, sync).items():
            out.setdefault(k, {})[state] = {"median_ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3}
        for k, v in variants.items():  # the state held: nothing cached, or every call after the first
            if v.configure is not None:
                want = 0 if state == "computed" else reps * per
                assert v.count() == want, f"{k}, {state} state: {v.count()} calls cached, expected {want}"
    return out


def step_rows(steps_ms: dict, fn_only: str) -> list[dict]:
    return [{"method": k, **{f"{state} step {stat} ms": v[state][f"{stat}_ms"] for state in v
                             for stat in ("median", "min")},
             "cached / Fn only (median)": v["cached"]["median_ms"] / steps_ms[fn_only]["cached"]["median_ms"]
             if "cached" in v else ""} for k, v in steps_ms.items()]


STEP_HEADERS = ["method", "computed step median ms", "computed step min ms", "cached step median ms",
                "cached step min ms", "cached / Fn only (median)"]


def distilled_sigmas(steps: int) -> list[float]:
    """The ``steps`` + 1 noise levels (1 down to 0) of the distilled-model scheduler above."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(DISTILLED_SCHEDULER)
    scheduler.set_timesteps(steps, mu=math.log(3))
    return [float(s) for s in scheduler.sigmas]


def denoise_sigmas(call, inputs: dict, sigmas: list[float]):
    """A flow-matching Euler loop over a Flux transformer on the given noise levels (timestep = sigma, as
    FluxPipeline passes it), no CFG (distilled models run none). Returns the final latent."""
    x = inputs["hidden_states"]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full_like(inputs["timestep"], sigma)
        with torch.no_grad():
            velocity = call(**{**inputs, "hidden_states": x, "timestep": t})[0]
        x = x + (sigma_next - sigma) * velocity
    return x
