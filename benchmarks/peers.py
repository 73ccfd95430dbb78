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

Few-step rows, on both configs: the same variants on 8-step requests over a distilled model's schedule
(Qwen-Image-Lightning's flow-matching scheduler, time shift 3; no CFG) with cache-dit's own cache limits
for that 8-step model (W4, at most 2 cached steps, never 2 in a row), the threshold bisected to cache the 2
steps the limits allow; cachedit-fx and cache-dit asserted equal to the compile=False run again.
"""
from __future__ import annotations

import copy
import os

import torch

from _common import LOAD_AT_START, build_flux, compile_own, first_block_only, flux_config, parse_args, table, \
    tune_threshold, write_json
from _compare import (DISTILLED_LIMITS, DISTILLED_WARMUP, INSTALL, STEP_HEADERS, Variant, cache_dit_lib,
                      cache_dit_variant, cachedit_variant, decision_mismatches, denoise_sigmas, distilled_sigmas,
                      fbc_variant, first_requests, graph_counts, interleaved_requests, per_step, request_rows,
                      step_rows)
from cachedit_fx import zoo

# name: (flux_config, image side (patch 1: side**2 tokens), text tokens, request reps, (per-step samples,
# calls per sample), few-step request reps)
CONFIGS = {
    "compute-bound": (flux_config(4, 8, heads=3), 32, 64, 3, (5, 1), 3),
    "latency-bound": (flux_config(2, 4, heads=1), 8, 16, 15, (15, 3), 15),
}
# (--quick: one tiny config; a second tiny one would repeat the same code path at twice the compile time)
QUICK_CONFIGS = {"tiny": (flux_config(2, 2, heads=1, head_dim=16, cond_dim=16), 4, 4, 1, (1, 1), 1)}
FEW_STEPS = 8
HEADERS = ["method", "cached steps", "median s", "min s", "speedup vs plain (median)", "speedup (min)",
           "efficiency vs ideal", "implied cached step ms", "first request s", "graphs / breaks (first request)"]
FEW_HEADERS = ["method", "cached steps", "median s", "min s", "speedup vs plain (median)", "efficiency vs ideal",
               "implied cached step ms"]


def make_variants(model, lib, inner, plain, fn_only):
    """Every method on its own copy of ``model`` and its own forward code object."""
    fx, _ = cachedit_variant(model, inner)
    variants = {plain: Variant(compile_own(copy.deepcopy(model), inner)), f"cachedit-fx ({inner})": fx}
    if lib is not None:
        variants[f"cache-dit 1.5.3 + torch.compile ({inner})"] = cache_dit_variant(lib, model, inner, False)
        variants[f"cache-dit 1.5.3 + regional compile ({inner})"] = cache_dit_variant(lib, model, inner, True)
    variants[f"diffusers FirstBlockCache + torch.compile ({inner})"] = fbc_variant(model, inner)
    variants[fn_only] = Variant(compile_own(first_block_only(model), inner))
    return variants


def configure_all(variants, threshold, warmup, **limits):
    for v in variants.values():
        if v.configure is not None:
            v.configure(threshold, warmup, **limits)


def timed_requests(name, variants, request, reps, expected, steps, plain, fn_only):
    """Interleaved requests of every variant after the first (untimed) ones; the decisions checked against
    ``expected``. Returns (rows, timings, cached, first_s, graphs, graphs compiled during the timed reps)."""
    first_s, graphs = first_requests(variants, request)
    g0 = graph_counts()
    timings, cached = interleaved_requests(variants, request, reps)
    recompiled = [a - b for a, b in zip(graph_counts(), g0)]
    same = [k for k in variants if k.startswith(("cachedit-fx", "cache-dit"))]
    bad = decision_mismatches(cached, expected, same)
    assert not bad, f"{name}: " + "; ".join(bad)
    assert expected, f"{name}: no step cached (the comparison tests nothing)"
    rows = request_rows(timings, {k: c[0][1] for k, c in cached.items()}, steps, plain, fn_only, len(expected))
    for row in rows:
        if row["method"] in first_s:
            row["first request s"] = first_s[row["method"]]
            row["graphs / breaks (first request)"] = "%d / %d" % tuple(graphs[row["method"]])
    return rows, timings, cached, first_s, graphs, recompiled


def bench_config(name, spec, args, lib, inner, steps):
    config, side, txt, reps, step_reps, few_reps = spec
    plain, fn_only = f"plain {inner} (uncached)", f"Fn only ({inner}, every step)"
    model, inputs, info = build_flux(config, side, txt)
    sigmas = distilled_sigmas(FEW_STEPS)

    def request(call):
        return zoo.denoise(model, "flux", inputs, num_steps=steps, call=call)[0]

    def few_request(call):
        return denoise_sigmas(call, inputs, sigmas)

    with torch.no_grad():
        eager, h_eager = cachedit_variant(model, "eager")
        thr, tuning = tune_threshold(lambda: request(eager.call), h_eager, steps, 1 if args.quick else 4)
        expected = eager.cached()
        # the limits allow 2 cached steps of 8: bisect until both are (4 rounds even in --quick: 8 tiny calls each)
        few_thr, few_tuning = tune_threshold(lambda: few_request(eager.call), h_eager, FEW_STEPS, 4,
                                             target=(0.25, 0.25), warmup=DISTILLED_WARMUP, **DISTILLED_LIMITS)
        few_expected = eager.cached()
        variants = make_variants(model, lib, inner, plain, fn_only)
        configure_all(variants, thr, 4)
        rows, timings, cached, first_s, graphs, recompiled = timed_requests(
            name, variants, request, reps, expected, steps, plain, fn_only)
        g0 = graph_counts()
        steps_ms = per_step(variants, inputs, plain, fn_only, *step_reps)
        recompiled_per_step = [a - b for a, b in zip(graph_counts(), g0)]
        configure_all(variants, few_thr, DISTILLED_WARMUP, **DISTILLED_LIMITS)
        few_rows, few_timings, few_cached, _, few_graphs, _ = timed_requests(
            f"{name} few-step", variants, few_request, few_reps, few_expected, FEW_STEPS, plain, fn_only)
    if lib is None:
        rows.append({"method": "cache-dit 1.5.3", "cached steps": f"not installed: {INSTALL}"})
    print(f"\n### {name}: {info['model']}; {steps} Euler steps, F1B0, W4, threshold {thr:.4g}; "
          f"{reps} interleaved reps\n")
    print(table(HEADERS, rows))
    print(f"\ncached steps ({'cachedit-fx = cache-dit' if lib else 'cachedit-fx'} = compile=False run, asserted): "
          f"{list(expected)}; graphs compiled during the "
          f"timed reps: {recompiled[0]}, graph breaks: {recompiled[1]}")
    print(f"\nper step: single calls at a fixed state, {step_reps[0]} x {step_reps[1]} interleaved (computed: "
          f"threshold 0; cached: threshold 1e9, no warmup, after one computing call; FirstBlockCache's threshold "
          f"is set on its hook, no recompile); graphs compiled meanwhile: {recompiled_per_step[0]}\n")
    print(table(STEP_HEADERS, step_rows(steps_ms, fn_only)))
    few_new_graphs = sum(g[0] for g in few_graphs.values())
    print(f"\n### {name}, few-step: {FEW_STEPS} steps on a distilled model's schedule (Qwen-Image-Lightning's: "
          f"flow matching, time shift 3), no CFG; F1B0, W{DISTILLED_WARMUP}, max_cached_steps "
          f"{DISTILLED_LIMITS['max_cached_steps']}, max_continuous_cached_steps "
          f"{DISTILLED_LIMITS['max_continuous_cached_steps']} (cache-dit's config for that 8-step model), threshold "
          f"{few_thr:.4g}; {few_reps} interleaved reps after one untimed request each (graphs compiled by it: "
          f"{few_new_graphs})\n")
    print(table(FEW_HEADERS, few_rows))
    print(f"\ncached steps ({'cachedit-fx = cache-dit' if lib else 'cachedit-fx'} = compile=False run, asserted): "
          f"{list(few_expected)}; FirstBlockCache (threshold alone, no warmup or limits): "
          f"{few_cached[next(k for k in variants if 'FirstBlockCache' in k)][0][0]}")
    return {"info": info, "config": config, "side": side, "text_tokens": txt, "reps": reps, "threshold": thr,
            "tuning": tuning, "cached_steps": list(expected), "rows": rows, "timings_s": timings,
            "cached_per_rep": {k: [c[1] for c in v] for k, v in cached.items()}, "first_request_s": first_s,
            "graphs_breaks_first_request": graphs, "graphs_breaks_timed": recompiled, "per_step_ms": steps_ms,
            "per_step_reps": step_reps, "graphs_breaks_per_step": recompiled_per_step,
            "few_step": {"steps": FEW_STEPS, "sigmas": sigmas, "warmup": DISTILLED_WARMUP, **DISTILLED_LIMITS,
                         "threshold": few_thr, "tuning": few_tuning, "cached_steps": list(few_expected),
                         "reps": few_reps, "rows": few_rows, "timings_s": few_timings,
                         "cached_per_rep": {k: [c[1] for c in v] for k, v in few_cached.items()},
                         "graphs_breaks_first_request": few_graphs}}


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
