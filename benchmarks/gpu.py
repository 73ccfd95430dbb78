"""A FLUX.1-dev-shaped transformer on one CUDA GPU: every peer at identical decisions, whole requests.

    python benchmarks/gpu.py [--blocks 19,38] [--steps 28] [--reps 3] [--quick]

The model: FLUX.1-dev's transformer config (19 double + 38 single blocks, dim 3072 = 24 heads x 128, T5 width
4096, guidance embedding) with random bf16 weights made on the GPU (23.8 GB: FLUX.1-dev is 11.9B parameters),
at 1024 x 1024 (a 128 x 128 latent packed 2 x 2: 4096 image tokens, 64 channels) and 512 text tokens;
``--blocks D,S`` shrinks it to D double + S single blocks. Variants, each on a structure copy of the model
that shares its weights and on its own forward code object (``_common.compile_own``):

- plain ``torch.compile`` (Inductor);
- cachedit-fx (``enable_cache``, inner Inductor);
- with CUDA graphs, plain ``mode="reduce-overhead"`` and cachedit-fx with Inductor's ``triton.cudagraphs``,
  only where a probe finds that Inductor keeps CUDA graphs for a graph holding ``torch.cond`` (torch 2.13
  does not: docs/benchmarks.md, "GPU", says why, from its source);
- cache-dit 1.5.3 + ``torch.compile`` of the whole transformer (its recommended Dynamo settings);
- diffusers FirstBlockCache + ``torch.compile``;
- the Fn-only model (first double block only, Inductor) for the ideal.

One config for all: F1B0, no warmup (FirstBlockCache has none, so with ``max_warmup_steps=0`` it takes the
decisions DBCache takes), no separate CFG (FLUX.1-dev embeds its guidance), the threshold bisected on the
compiled cachedit-fx instance to cache 40-50 % of the steps and centred between the diffs it compared (the
widest margin against another implementation's bf16 rounding). Every request of every caching variant must
cache exactly the steps the tuning run cached; the script prints and writes everything first and then
fails if one did not.

Prints the request table (median and min of ``--reps`` interleaved requests after one untimed request each,
speedup vs plain, efficiency vs ideal, the first request's time and compile time = first request - a warm
all-computing request, peak GPU memory), a per-step table (single calls at a fixed state) and the plan's
time estimate against the run's; writes benchmarks/results/gpu.json. ``--quick``: the same code on the CPU
with a tiny Flux of the same shape family (guidance embedding, bf16), 8 steps, every compile with the
``eager`` backend (the tests run it; no timing claims).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from _common import (LOAD_AT_START, build_flux, cachedit_model, compile_own, first_block_only, flux_config,
                     flux_dev_config, parse_args, shared_copy, table, tune_threshold, write_json)
from _compare import (INSTALL, STEP_HEADERS, Variant, cache_dit_lib, cache_dit_variant, cachedit_variant,
                      decision_mismatches, fbc_variant, first_requests, handle_variant, interleaved_requests,
                      per_step, request_rows, step_rows)
from cachedit_fx import zoo

H100_BF16_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor-core peak
ASSUMED_MFU = 0.5  # sustained fraction: 4.2 s for 28 compiled FLUX.1-dev steps at 1024^2, as published for an H100
FULL_COMPILE_S = 67.0  # a cold Inductor compile of the whole 57-block FLUX.1-dev transformer on an H100 (published)
PLAIN, FX, FN_ONLY = "plain torch.compile", "cachedit-fx", "Fn-only model (every step)"
HEADERS = ["method", "cached steps", "median s", "min s", "speedup vs plain (median)", "speedup (min)",
           "efficiency vs ideal", "implied cached step ms", "first request s", "compile s", "peak GiB",
           "peak over start GiB", "graphs / breaks (first request)"]


def step_tflop(config: dict, image_tokens: int, text_tokens: int) -> float:
    """TFLOP of one transformer call: per block and token 12 d^2 multiply-adds in its linear layers (a double
    block's stream: qkv 3, out 1, MLP 8; a single block: qkv 3, MLP in 4, out 5), attention 4 L^2 d."""
    d = config["attention_head_dim"] * config["num_attention_heads"]
    tokens = image_tokens + text_tokens
    per_block = 24 * d * d * tokens + 4 * tokens * tokens * d
    return (config["num_layers"] + config["num_single_layers"]) * per_block / 1e12


def estimate(config, image_tokens, text_tokens, steps, reps, step_reps, n_compiles) -> dict:
    """The plan's GPU seconds from FLOPs: a computed step at ASSUMED_MFU of the H100's peak, a cached step as
    the first double block's share of it, 45 % of the steps cached; the requests each variant runs (first,
    warm, reps: cachedit-fx's first computes every step, the others' run at the tuned threshold; the tuning's
    1 + up to 4); compiles scaled from FULL_COMPILE_S by depth."""
    step_s = step_tflop(config, image_tokens, text_tokens) / (H100_BF16_TFLOPS * ASSUMED_MFU)
    blocks = config["num_layers"] + config["num_single_layers"]
    full_s, cached_s = steps * step_s, steps * step_s * (0.55 + 0.45 / blocks)
    requests_s = (2 + reps) * full_s  # plain
    requests_s += full_s + (1 + reps) * cached_s + 2 * (2 + reps) * cached_s  # cachedit-fx; cache-dit, FBC
    requests_s += full_s + 4 * cached_s  # the tuning
    requests_s += (2 + reps) * steps * step_s / blocks + step_reps * 5 * step_s  # Fn-only; the per-step table
    compile_s = n_compiles * FULL_COMPILE_S * blocks / 57 + 10  # + the Fn-only model and the probe
    return {"computed_step_s": step_s, "request_s": full_s, "requests_s": requests_s, "compile_s": compile_s,
            "total_s": requests_s + compile_s + 30}  # + start, imports, building the model


def cudagraphs_take_cond(device) -> tuple[bool, str]:
    """Whether Inductor keeps CUDA graphs for a graph holding ``torch.cond`` on this build: compiles a
    three-op cond with ``mode="reduce-overhead"`` and reads Inductor's cudagraph-skip counter."""
    if torch.device(device).type != "cuda":
        return False, "no CUDA device: CUDA graphs do not apply"
    from torch._dynamo.utils import counters

    def f(x, p):
        return torch.cond(p, lambda x: x.sin(), lambda x: x.cos(), (x,)) + 1

    before = counters["inductor"]["cudagraph_skips"]
    g = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    x, p = torch.randn(64, device=device), torch.tensor(True, device=device)
    for _ in range(3):
        g(x, p)
    skipped = counters["inductor"]["cudagraph_skips"] - before
    return (skipped == 0, "captured" if skipped == 0 else
            f"Inductor skipped CUDA graphs for the probe's cond ({skipped} skip(s) counted)")


def make_variants(model, lib, inner, cudagraphs):
    """(variants, the cachedit-fx handle, the names whose decisions must equal the tuning run's)."""
    fx, h_fx = cachedit_variant(model, inner, shared_copy)
    variants = {PLAIN: Variant(compile_own(shared_copy(model), inner)), FX: fx}
    if cudagraphs:  # each call a new CUDA-graph step: zoo.denoise keeps the earlier outputs, never reads them
        plain_cg = compile_own(shared_copy(model), inner, mode="reduce-overhead")
        compiled, handle = cachedit_model(model, 0.0, inner, shared_copy, inner_options={"triton.cudagraphs": True})
        variants[f"{PLAIN}, mode=reduce-overhead"] = Variant(new_graph_step(plain_cg))
        variants[f"{FX}, triton.cudagraphs"] = handle_variant(new_graph_step(compiled), handle)
    if lib is not None:
        variants["cache-dit 1.5.3 + torch.compile"] = cache_dit_variant(lib, model, inner, False, shared_copy)
    variants["diffusers FirstBlockCache + torch.compile"] = fbc_variant(model, inner, shared_copy)
    variants[FN_ONLY] = Variant(compile_own(first_block_only(model, shared_copy), inner))
    same = [k for k, v in variants.items() if v.configure is not None]
    return variants, h_fx, same


def new_graph_step(compiled):
    def call(**kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(**kwargs)

    return call


def warm_requests(variants, request, sync, device) -> tuple[dict, dict]:
    """One more untimed request per variant (at the tuned threshold): ({name: (peak GiB, peak above the
    start GiB)} on CUDA, else {}; {name: whether its final latent is finite})."""
    cuda = torch.device(device).type == "cuda"
    memory, finite = {}, {}
    for name, v in variants.items():
        v.reset()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        out = request(v.call)
        sync()
        finite[name] = bool(torch.isfinite(out).all())
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            memory[name] = (peak / 2**30, (peak - start) / 2**30)
    return memory, finite


def extra_columns(rows, first_s, graphs, timings, memory) -> None:
    """The first request, its compile time, peak memory and Dynamo's graphs / breaks, into ``rows``.
    compile s = first request - the same request warm: cachedit-fx's first request computes every step
    (it compiles before the threshold is tuned on it), so the plain median; every other variant's first
    request is at its tuned numbers, so its own median."""
    for row in rows:
        k = row["method"]
        if k not in first_s:
            continue
        warm = statistics.median(timings[PLAIN if k == FX else k])
        row.update({"first request s": first_s[k], "compile s": first_s[k] - warm,
                    "graphs / breaks (first request)": "%d / %d" % tuple(graphs[k])})
        if k in memory:
            row.update({"peak GiB": memory[k][0], "peak over start GiB": memory[k][1]})


def parse(argv_extra):
    argv_extra.add_argument("--blocks", default=None, type=lambda s: tuple(int(x) for x in s.split(",")),
                            help="D,S: double and single blocks (default 19,38: FLUX.1-dev; --quick 2,2)")
    argv_extra.add_argument("--steps", type=int, default=None, help="steps a request (default 28; --quick 8)")
    argv_extra.add_argument("--reps", type=int, default=None, help="timed requests each (default 3; --quick 1)")


def setup(args):
    """(config, image side, text tokens, device, inner, steps, reps, per-step samples)."""
    if args.quick:
        d, s = args.blocks or (2, 2)
        config = {**flux_config(d, s, heads=2, head_dim=16, cond_dim=16), "guidance_embeds": True}
        return config, 4, 4, "cpu", "eager", args.steps or 8, args.reps or 1, 1
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA build of torch and a GPU (--quick runs it on the CPU, tiny)")
    d, s = args.blocks or (19, 38)
    return flux_dev_config(d, s), 64, 512, "cuda", "inductor", args.steps or 28, args.reps or 3, 10


def measure(model, inputs, lib, inner, steps, reps, step_reps, cudagraphs, device, log) -> dict:
    """Compile, tune, time: cachedit-fx's first request (compiles) and the threshold tuned on it, then every
    other variant's first request at the tuned numbers, one warm request each (peak memory, finite output),
    ``reps`` interleaved requests, the per-step table."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def request(call):
        return zoo.denoise(model, "flux", inputs, num_steps=steps, call=call)[0]

    variants, h_fx, same = make_variants(model, lib, inner, cudagraphs)
    first_s, graphs = first_requests({FX: variants[FX]}, request, sync)
    thr, tuning = tune_threshold(lambda: request(variants[FX].call), h_fx, steps, 4, warmup=0)
    expected = variants[FX].cached()
    for v in variants.values():
        if v.configure is not None:
            v.configure(thr, 0)
    log(f"{FX} compiled ({first_s[FX]:.1f} s); threshold {thr:.4g} caches {expected} (margin "
        f"{tuning[-1]['margin']:.1%} to the nearest diff compared)")
    others, others_graphs = first_requests({k: v for k, v in variants.items() if k != FX}, request, sync)
    first_s, graphs = {**first_s, **others}, {**graphs, **others_graphs}
    log("first requests (compiles): " + ", ".join(f"{k} {v:.1f} s" for k, v in others.items()))
    memory, finite = warm_requests(variants, request, sync, device)
    timings, cached = interleaved_requests(variants, request, reps, sync)
    log(f"{reps} interleaved requests each")
    steps_ms = per_step(variants, inputs, PLAIN, FN_ONLY, step_reps, 1, sync)
    log("per-step table")
    bad = decision_mismatches(cached, expected, same) + [f"{k}: non-finite latent" for k, ok in finite.items()
                                                         if not ok]
    return {"threshold": thr, "tuning": tuning, "cached_steps": expected, "timings_s": timings, "cached": cached,
            "first_request_s": first_s, "graphs_breaks_first_request": graphs, "memory_gib": memory,
            "per_step_ms": steps_ms, "decision_mismatches": bad}


def main():
    started = time.perf_counter()

    def log(what):
        print(f"[{time.perf_counter() - started:6.1f} s] {what}", flush=True)

    args = parse_args("gpu", parse)
    config, side, txt, device, inner, steps, reps, step_reps = setup(args)
    lib = cache_dit_lib()
    cudagraphs, cudagraphs_why = cudagraphs_take_cond(device)
    n_compiles = 4 + 2 * cudagraphs - (lib is None)
    plan = estimate(config, side * side, txt, steps, reps, step_reps, n_compiles)
    print(f"## gpu (inner {inner}, {device}; load average at start {tuple(round(x, 2) for x in LOAD_AT_START or ())})")
    print(f"\nplan (H100 estimate): {step_tflop(config, side * side, txt):.1f} TFLOP a call; at {ASSUMED_MFU:.0%} of "
          f"{H100_BF16_TFLOPS:.0f} TFLOP/s: {plan['computed_step_s']:.3f} s a computed step, requests "
          f"{plan['requests_s']:.0f} s + {n_compiles} whole-model compiles {plan['compile_s']:.0f} s, about "
          f"{plan['total_s']:.0f} s in all. CUDA graphs with torch.cond: {cudagraphs_why}")
    model, inputs, info = build_flux(config, side, txt, device=device, dtype=torch.bfloat16)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    log(f"built {info['model']} ({weights_gib:.1f} GiB of weights)")
    with torch.no_grad():
        r = measure(model, inputs, lib, inner, steps, reps, step_reps, cudagraphs, device, log)
    counts = {k: c[0][1] for k, c in r.pop("cached").items()}
    rows = request_rows(r["timings_s"], counts, steps, PLAIN, FN_ONLY, len(r["cached_steps"]))
    extra_columns(rows, r["first_request_s"], r["graphs_breaks_first_request"], r["timings_s"], r["memory_gib"])
    if lib is None:
        rows.append({"method": "cache-dit 1.5.3", "cached steps": f"not installed: {INSTALL}"})
    print(f"\n### {info['model']}; {steps} Euler steps, F1B0, no warmup, threshold {r['threshold']:.4g}; {reps} "
          f"interleaved requests after one untimed each; inner {inner}\n")
    print(table(HEADERS, rows))
    bad = r["decision_mismatches"]
    print(f"\ncached steps (every caching variant, every request, asserted): {r['cached_steps']}"
          + ("" if not bad else "\nMISMATCH: " + "; ".join(bad)))
    print(f"\nper step: single calls at a fixed state, {step_reps} interleaved (computed: threshold 0; cached: "
          f"threshold 1e9 after one computing call)\n")
    print(table(STEP_HEADERS, step_rows(r["per_step_ms"], FN_ONLY)))
    total = time.perf_counter() - started
    print(f"\nwall time {total:.0f} s (plan {plan['total_s']:.0f} s); weights {weights_gib:.1f} GiB; CUDA graphs "
          f"with torch.cond: {cudagraphs_why}")
    write_json("gpu", args, {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                             "info": info, "config": config, "image_tokens": side * side, "text_tokens": txt,
                             "steps": steps, "reps": reps, "inner": inner, "rows": rows, "weights_gib": weights_gib,
                             "cudagraphs_with_cond": [cudagraphs, cudagraphs_why], "plan": plan, "wall_s": total,
                             "cache_dit": getattr(lib, "__version__", None), **r})
    assert not bad, "; ".join(bad)


if __name__ == "__main__":
    main()
