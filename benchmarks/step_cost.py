"""Per-step latency: eager, Inductor, cachedit full step, cachedit cached step, ideal (Fn only).

    python benchmarks/step_cost.py [--quick] [--latency-bound]

F1B0. "full": threshold 0 (gate threshold<=0, every step computes all blocks). "cached": threshold 1e9,
no warmup (the first call after reset computes, every later call is cached). "ideal": a copy of the
model keeping only the first double block, compiled with the same inner compiler: what a cached step
must cost at best. Calls are interleaved and each variant's median is reported. "Dynamo guards us":
the time Dynamo's guard checks take per call (profiler, 20 more calls): they cover every parameter and
submodule of the model compiled, so plain Inductor and cachedit pay the whole model's and the Fn-only
copy a fraction; "cached / ideal, guard gap removed" takes that difference out of the cached step.
The two "enable_cache cached step" rows are the install's (threshold 1e9 too): "full guards" was first
called before any request was marked, so Dynamo guards the whole module on every call; "guard-light"
after ``cachedit_fx.reset``, so the module's guards are dropped and its fingerprint checked per request
(install/owned.py). ``--latency-bound``: peers.py's latency-bound Flux (2 + 4 blocks, dim 128, 64 image
+ 16 text tokens) instead of the medium one, where those guards are a large part of a cached step.
"""
from __future__ import annotations

import copy

import torch

from _common import (LATENCY_BOUND, build_flux, build_model, cachedit_model, cfg, check_all_but_first_cached,
                     compile_own, first_block_only, guard_check_us, parse_args, table, time_interleaved, write_json)

LIGHT, FULL = "enable_cache cached step (guard-light)", "enable_cache cached step (full guards)"


def installed(model, inner: str, mark_request: bool):
    """(enable_cache copy of ``model`` caching every call after its first, handle); ``mark_request``:
    a request is marked on the host before the first call, which makes the compile guard-light."""
    import cachedit_fx as cf
    from cachedit_fx.install.hook import cache_hook

    m = cf.enable_cache(copy.deepcopy(model), cache_config=cfg(1e9, warmup=0), inner=inner)
    if mark_request:
        cf.reset(m)
    return m, cache_hook(m).handle


def request_check_ms(light, handle, samples: int = 9) -> float:
    """Median ms of the guard-light install's once-per-request work: a reset, then the module check
    its next call runs (nothing changed)."""
    import time

    import cachedit_fx as cf
    from cachedit_fx.install.hook import cache_hook

    owned, times = cache_hook(light).graph.owned, []
    for _ in range(samples):
        t0 = time.perf_counter()
        cf.reset(light)
        assert not owned.stale(light, handle)
        times.append(time.perf_counter() - t0)
    return sorted(times)[samples // 2] * 1e3


def parse(p):
    p.add_argument("--latency-bound", action="store_true", help="peers.py's latency-bound Flux (small, few tokens)")


def main():
    args = parse_args("step_cost", parse)
    quick = args.quick
    inner = "eager" if quick else "inductor"
    repeats, per = (3, 1) if quick else (15, 2)
    torch.manual_seed(0)
    if args.latency_bound and not quick:
        model, inputs, info = build_flux(*LATENCY_BOUND)
        model = model.eval()
    else:
        model, inputs, info = build_model(quick)
    plain = compile_own(copy.deepcopy(model), inner)
    full, h_full = cachedit_model(model, 0.0, inner)
    cached, h_cached = cachedit_model(model, 1e9, inner)
    ideal = compile_own(first_block_only(model), inner)
    light, h_light = installed(model, inner, True)
    full_guards, h_full_guards = installed(model, inner, False)
    plain_key, ideal_key = f"plain {inner}", f"ideal (F1 only, {inner})"
    variants = {"eager": model, plain_key: plain, "cachedit full step": full, "cachedit cached step": cached,
                LIGHT: light, FULL: full_guards, ideal_key: ideal}
    fns = {k: (lambda m=m: m(**inputs)) for k, m in variants.items()}
    import time
    compile_s = {}
    with torch.no_grad():
        for k, fn in fns.items():  # warm-up: compiles, then 2 more calls
            t0 = time.perf_counter()
            fn()
            compile_s[k] = time.perf_counter() - t0
            fn(), fn()
        res = time_interleaved(fns, repeats, per)
        guards = {k: guard_check_us(fn) for k, fn in fns.items()}
        # check the gates did what the names say
        from cachedit_fx.runtime.stats import collect
        full_cached = sum(s.n_cached for s in collect(h_full))
    assert full_cached == 0, f"full-step variant cached {full_cached} steps"
    n_c, n_s = check_all_but_first_cached(h_cached, "cached variant")
    for h, label in ((h_light, LIGHT), (h_full_guards, FULL)):
        check_all_but_first_cached(h, label)
    from cachedit_fx.install.hook import cache_hook
    assert cache_hook(light).graph.owned.light and not cache_hook(full_guards).graph.owned.light
    check_ms = request_check_ms(light, h_light)
    med = {k: v["median_s"] for k, v in res.items()}
    rows = [{"variant": k, "median ms": med[k] * 1e3, "min ms": res[k]["min_s"] * 1e3,
             "first call s": compile_s[k], "vs plain": med[k] / med[plain_key],
             "Dynamo guards us": guards[k]} for k in fns]
    # the guards check the whole model's parameters and submodules on every call (plain Inductor's too);
    # the Fn-only copy has fewer of them: what is left of the overhead without that difference
    guard_gap_s = (guards["cachedit cached step"] - guards[ideal_key]) * 1e-6
    ratios = {
        "cached / ideal": med["cachedit cached step"] / med[ideal_key],
        "full / plain": med["cachedit full step"] / med[plain_key],
        "plain / eager": med[plain_key] / med["eager"],
        "ideal speedup (plain / ideal)": med[plain_key] / med[ideal_key],
        "cached speedup (plain / cached)": med[plain_key] / med["cachedit cached step"],
        "cached / ideal, guard gap removed": (med["cachedit cached step"] - guard_gap_s) / med[ideal_key],
        "enable_cache cached / ideal, full guards": med[FULL] / med[ideal_key],
        "enable_cache cached / ideal, guard-light": med[LIGHT] / med[ideal_key],
        "guard-light / full guards (cached step)": med[LIGHT] / med[FULL],
        "guard-light per-request check ms (once per request, not in the steps above)": check_ms,
    }
    targets = {"cached / ideal <= 1.05": ratios["cached / ideal"] <= 1.05,
               "full / plain <= 1.02": ratios["full / plain"] <= 1.02}
    print(f"## step_cost ({info['model']}; inner {inner}; {repeats}x{per} interleaved calls, medians)\n")
    print(table(["variant", "median ms", "min ms", "first call s", "vs plain", "Dynamo guards us"], rows))
    print()
    print(table(["ratio", "value"], [{"ratio": k, "value": v} for k, v in ratios.items()]))
    print("\ntargets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    write_json("step_cost", args, {"info": info, "inner": inner, "repeats": repeats, "calls_per_sample": per,
                                   "results": res, "first_call_s": compile_s, "ratios": ratios,
                                   "targets": targets, "cached_steps": [n_c, n_s],
                                   "dynamo_guard_check_us": guards})


if __name__ == "__main__":
    main()
