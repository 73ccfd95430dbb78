"""Every peer side by side, in one run: full 28-step requests on a compute-bound and a latency-bound Flux.

    python benchmarks/peers.py [--quick]

Variants (each a whole request, zoo.denoise's Euler loop; interleaved A B C ... per rep; median and min):
plain Inductor (uncached); cachedit-fx (enable_cache, inner Inductor); cache-dit 1.5.3 with torch.compile of
the whole transformer and with regional compile (diffusers' compile_repeated_blocks, as cache-dit's own
examples do); diffusers FirstBlockCache under torch.compile; and the Fn-only model (first double block
only), the floor of a cached step. cachedit-fx and cache-dit share one config (F1B0, W4, one threshold,
bisected on a compile=False cachedit-fx instance to cache ~45% of the steps), so they must take the same
decisions: the script asserts their cached-step lists are equal. FirstBlockCache runs at the same threshold
(its diff is against the last computed step, so its count differs; reported).

"ideal" for a request caching n of N steps = (N - n) x plain step + n x Fn-only step, both measured in this
run (request time / N); efficiency = ideal / method time, each at its own n (plain: n = 0). "implied cached
step ms" = (method median - (N - n) x plain step) / n: a cached step's cost if the computed steps cost a plain
step (derived, not timed alone; the Fn-only row gives its step, the floor).
"""
from __future__ import annotations

import copy
import logging
import os
import statistics
import time

import torch

from _common import (FBC, LOAD_AT_START, build_flux, cachedit, cfg, compile_own, first_block_only, flux_config,
                     parse_args, table, time_interleaved, tune_threshold, write_json)
from cachedit_fx.install.api import summary
from cachedit_fx import zoo

# name: (flux_config, image side (patch 1: side**2 tokens), text tokens, request reps, (per-step samples,
# calls per sample))
CONFIGS = {
    "compute-bound": (flux_config(4, 8, heads=3), 32, 64, 3, (5, 1)),
    "latency-bound": (flux_config(2, 4, heads=1), 8, 16, 15, (15, 3)),
}
# (--quick: one tiny config; a second tiny one would repeat the same code path at twice the compile time)
QUICK_CONFIGS = {"tiny": (flux_config(2, 2, heads=1, head_dim=16, cond_dim=16), 4, 4, 1, (1, 1))}
INSTALL = "pip install --no-deps cache-dit==1.5.3 pyyaml accelerate"


class Variant:
    """One method: ``call`` stands in for the transformer, ``reset`` starts a request, ``cached()`` the
    last request's cached step indices (None where only a count is known: ``count()``); ``fix(threshold)``
    (where the method can be reconfigured without a recompile) sets no warmup and that threshold and starts
    afresh: 0 computes every step, 1e9 caches every step after the first (the per-step table)."""

    def __init__(self, call, reset=None, cached=None, count=None, fix=None):
        self.call, self.reset = call, reset or (lambda: None)
        self.cached = cached or (lambda: None)
        self.count = count or (lambda: len(self.cached() or []))
        self.fix = fix


def cache_dit_lib():
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


def cache_dit_variant(lib, model, thr, inner, regional):
    m = copy.deepcopy(model)

    def config(threshold=thr, warmup=4):
        return lib.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                 max_warmup_steps=warmup, enable_separate_cfg=False)

    lib.enable_cache(m, cache_config=config())
    if regional:  # compiles each block in place; the cache-dit wrappers around them stay eager
        m.compile_repeated_blocks(backend=inner, dynamic=False)
        call = m
    else:
        call = compile_own(m, inner)

    def cached():
        return list(m._context_manager.get_context(m._context_names[-1]).cached_steps)

    return Variant(call, lambda: lib.refresh_context(m, cache_config=config()), cached,
                   fix=lambda t: lib.refresh_context(m, cache_config=config(t, 0)))


def per_step(variants, inputs, plain, fn_only, reps, per):
    """Single calls at a fixed state, interleaved: each method's computed step (plain: every call) and
    cached step (Fn only: every call); ms, median and min."""
    out = {}
    for state, thr in (("computed", 0.0), ("cached", 1e9)):
        fns = {}
        for k, v in variants.items():
            if v.fix is not None:
                v.fix(thr)
                v.call(**inputs)  # the first call after a fresh start computes
            if v.fix is not None or k == (plain if state == "computed" else fn_only):
                fns[k] = lambda v=v: v.call(**inputs)
        for k, r in time_interleaved(fns, reps, per).items():
            out.setdefault(k, {})[state] = {"median_ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3}
        for k, v in variants.items():  # the state held: nothing cached, or every call after the first
            if v.fix is not None:
                want = 0 if state == "computed" else reps * per
                assert v.count() == want, f"{k}, {state} state: {v.count()} calls cached, expected {want}"
    return out


def graph_counts():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def bench_config(name, spec, args, lib, inner, steps):
    config, side, txt, reps, step_reps = spec
    plain, fn_only = f"plain {inner} (uncached)", f"Fn only ({inner}, every step)"
    model, inputs, info = build_flux(config, side, txt)

    def request(call):
        return zoo.denoise(model, "flux", inputs, num_steps=steps, call=call)[0]

    with torch.no_grad():
        eager_c, h_eager = cachedit(model, "eager")
        thr, tuning = tune_threshold(lambda: request(eager_c), h_eager, steps, 1 if args.quick else 4)
        expected = next(s.cached_steps for s in summary(eager_c, logging=False) if s.unmatched is None)
        fx, h_fx = cachedit(model, inner)
        h_fx.configure(cfg(thr))
        fbc = FBC(model, thr, compile_backend=inner)
        variants = {
            plain: Variant(compile_own(copy.deepcopy(model), inner)),
            f"cachedit-fx ({inner})": Variant(fx, h_fx.reset, lambda: next(
                s.cached_steps for s in summary(fx, logging=False) if s.unmatched is None),
                fix=lambda t: (h_fx.configure(cfg(t, warmup=0)), h_fx.reset())),
        }
        if lib is not None:
            variants[f"cache-dit 1.5.3 + torch.compile ({inner})"] = cache_dit_variant(lib, model, thr, inner, False)
            variants[f"cache-dit 1.5.3 + regional compile ({inner})"] = cache_dit_variant(lib, model, thr, inner, True)
        variants[f"diffusers FirstBlockCache + torch.compile ({inner})"] = Variant(fbc, fbc.reset,
                                                                                 count=fbc.cached_steps)
        variants[fn_only] = Variant(compile_own(first_block_only(model), inner))
        first_s, graphs = {}, {}
        for vname, v in variants.items():  # first request compiles; outside the timing
            g0 = graph_counts()
            v.reset()
            t0 = time.perf_counter()
            request(v.call)
            first_s[vname] = time.perf_counter() - t0
            graphs[vname] = [a - b for a, b in zip(graph_counts(), g0)]
        g0 = graph_counts()
        timings = {k: [] for k in variants}
        cached = {k: [] for k in variants}
        for _ in range(reps):
            for vname, v in variants.items():
                v.reset()
                t0 = time.perf_counter()
                request(v.call)
                timings[vname].append(time.perf_counter() - t0)
                cached[vname].append((v.cached(), v.count()))
        recompiled = [a - b for a, b in zip(graph_counts(), g0)]
        g0 = graph_counts()
        steps_ms = per_step(variants, inputs, plain, fn_only, *step_reps)
        recompiled_per_step = [a - b for a, b in zip(graph_counts(), g0)]
    # decisions: stable across reps; cachedit-fx and cache-dit identical to the compile=False tuning run
    for vname, runs in cached.items():
        assert all(r == runs[0] for r in runs), f"{name} / {vname}: decisions differ between reps: {runs}"
    same = [k for k in variants if k.startswith(("cachedit-fx", "cache-dit"))]
    for k in same:
        assert cached[k][0][0] == list(expected), \
            f"{name} / {k}: cached steps {cached[k][0][0]}, the compile=False cachedit-fx run cached {list(expected)}"
    assert expected, f"{name}: no step cached at threshold {thr} (the comparison tests nothing)"
    med = {k: statistics.median(v) for k, v in timings.items()}
    low = {k: min(v) for k, v in timings.items()}

    def ideal(n, t):  # t: median or min request times
        return ((steps - n) * t[plain] + n * t[fn_only]) / steps

    def implied(n, k):  # what each cached step cost, if its computed steps cost a plain step
        if k == fn_only:
            return 1e3 * med[fn_only] / steps
        return 1e3 * (med[k] - (steps - n) * med[plain] / steps) / n if n else ""

    rows = []
    for k in variants:
        n = cached[k][0][1] if k != fn_only else steps
        rows.append({"method": k, "cached steps": f"{n}/{steps}" if k != fn_only else "(all Fn only)",
                     "median s": med[k], "min s": low[k], "speedup vs plain (median)": med[plain] / med[k],
                     "speedup (min)": low[plain] / low[k],
                     "efficiency vs ideal": ideal(n, med) / med[k] if k != fn_only else "",
                     "implied cached step ms": implied(n, k), "first request s": first_s[k],
                     "graphs / breaks (first request)": "%d / %d" % tuple(graphs[k])})
    n_same = len(expected)
    rows.append({"method": f"ideal (computed x plain step + cached x Fn-only step, {n_same} cached)",
                 "cached steps": f"{n_same}/{steps}", "median s": ideal(n_same, med), "min s": ideal(n_same, low),
                 "speedup vs plain (median)": med[plain] / ideal(n_same, med),
                 "speedup (min)": low[plain] / ideal(n_same, low), "efficiency vs ideal": 1.0})
    if lib is None:
        rows.append({"method": "cache-dit 1.5.3", "cached steps": f"not installed: {INSTALL}"})
    headers = ["method", "cached steps", "median s", "min s", "speedup vs plain (median)", "speedup (min)",
               "efficiency vs ideal", "implied cached step ms", "first request s", "graphs / breaks (first request)"]
    print(f"\n### {name}: {info['model']}; {steps} Euler steps, F1B0, W4, threshold {thr:.4g}; "
          f"{reps} interleaved reps\n")
    print(table(headers, rows))
    print(f"\ncached steps ({'cachedit-fx = cache-dit' if lib else 'cachedit-fx'} = compile=False run, asserted): "
          f"{list(expected)}; graphs compiled during the "
          f"timed reps: {recompiled[0]}, graph breaks: {recompiled[1]}")
    step_rows = [{"method": k, **{f"{state} step {stat} ms": v[state][f"{stat}_ms"] for state in v
                                  for stat in ("median", "min")},
                  "cached / Fn only (median)": v["cached"]["median_ms"] / steps_ms[fn_only]["cached"]["median_ms"]
                  if "cached" in v else ""} for k, v in steps_ms.items()]
    print(f"\nper step: single calls at a fixed state, {step_reps[0]} x {step_reps[1]} interleaved (computed: "
          f"threshold 0; cached: threshold 1e9, no warmup, after one computing call; FirstBlockCache cannot be "
          f"reconfigured without a recompile); graphs compiled meanwhile: {recompiled_per_step[0]}\n")
    print(table(["method", "computed step median ms", "computed step min ms", "cached step median ms",
                 "cached step min ms", "cached / Fn only (median)"], step_rows))
    return {"info": info, "config": config, "side": side, "text_tokens": txt, "reps": reps, "threshold": thr,
            "tuning": tuning, "cached_steps": list(expected), "rows": rows, "timings_s": timings,
            "cached_per_rep": {k: [c[1] for c in v] for k, v in cached.items()}, "first_request_s": first_s,
            "graphs_breaks_first_request": graphs, "graphs_breaks_timed": recompiled, "per_step_ms": steps_ms,
            "per_step_reps": step_reps, "graphs_breaks_per_step": recompiled_per_step}


def main():
    args = parse_args("peers")
    inner = "eager" if args.quick else "inductor"
    steps = 8 if args.quick else 28
    lib = cache_dit_lib()
    print(f"## peers (inner {inner}; load average at start {tuple(round(x, 2) for x in LOAD_AT_START or ())})")
    if lib is None:
        print(f"\ncache-dit is not importable: its rows are skipped ({INSTALL})")
    results = {}
    for name, spec in (QUICK_CONFIGS if args.quick else CONFIGS).items():
        results[name] = bench_config(name, spec, args, lib, inner, steps)
        # the next config's models are new instances of the same classes: start Dynamo's caches afresh
        # (they are keyed on the shared forward code objects, with a recompile limit)
        torch._dynamo.reset()
    print(f"\nload average at end: {tuple(round(x, 2) for x in os.getloadavg())}")
    write_json("peers", args, {"inner": inner, "steps": steps, "cache_dit": getattr(lib, "__version__", None),
                               "configs": results})


if __name__ == "__main__":
    main()
