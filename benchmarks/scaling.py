"""Cached-step overhead as the sequence and the depth grow: cachedit-fx's compiled cached step against the
compiled Fn-only model (the floor of a cached step), F1B0.

    python benchmarks/scaling.py [--quick]

Points: image tokens 256 / 1024 / 4096 at 4 double + 8 single blocks, and 2+4 / 8+16 blocks at 1024 tokens
(dim 128, 32 text tokens). "cached": the cachedit backend at threshold 1e9, no warmup (the first call after
reset computes, every later one is cached; asserted); "ideal": a copy keeping only the first double block,
compiled with the same inner compiler. Single calls interleaved; median and min. The overhead (cached - ideal)
is the cache glue: the diff test, the cond, reading and writing the cached residual.
"""
from __future__ import annotations

import torch

from _common import (build_flux, cachedit_model, check_all_but_first_cached, compile_own, first_block_only,
                     flux_config, parse_args, table, time_interleaved, write_json)

# (image side (patch 1: side**2 tokens), double blocks, single blocks)
POINTS = [(16, 4, 8), (32, 4, 8), (64, 4, 8), (32, 2, 4), (32, 8, 16)]
QUICK_POINTS = [(4, 2, 2), (8, 2, 2), (4, 2, 4)]


def main():
    args = parse_args("scaling")
    quick = args.quick
    inner = "eager" if quick else "inductor"
    repeats, per = (3, 1) if quick else (10, 2)
    heads, head_dim, txt = (1, 16, 4) if quick else (2, 64, 32)
    rows, raw = [], []
    for side, double, single in (QUICK_POINTS if quick else POINTS):
        model, inputs, info = build_flux(flux_config(double, single, heads=heads, head_dim=head_dim,
                                                     cond_dim=head_dim * heads // 2), side, txt)
        cached, handle = cachedit_model(model, 1e9, inner)
        ideal = compile_own(first_block_only(model), inner)
        fns = {"cached": lambda: cached(**inputs), "ideal": lambda: ideal(**inputs)}
        with torch.no_grad():
            for fn in fns.values():  # compile, then 2 warm calls (the cached model's first call computes)
                fn(), fn(), fn()
            res = time_interleaved(fns, repeats, per)
        n_c, n_s = check_all_but_first_cached(handle, info["model"])
        c, i = res["cached"], res["ideal"]
        rows.append({"tokens": f"{side * side} + {txt}", "blocks": f"{double} + {single}",
                     "cached ms": c["median_s"] * 1e3, "ideal ms": i["median_s"] * 1e3,
                     "overhead ms": (c["median_s"] - i["median_s"]) * 1e3,
                     "overhead % of ideal": 100 * (c["median_s"] / i["median_s"] - 1),
                     "cached min ms": c["min_s"] * 1e3, "ideal min ms": i["min_s"] * 1e3,
                     "overhead min ms": (c["min_s"] - i["min_s"]) * 1e3,
                     "overhead min %": 100 * (c["min_s"] / i["min_s"] - 1)})
        raw.append({"info": info, "results": res, "cached_steps": [n_c, n_s]})
        # the next point's models share FluxTransformer2DModel.forward's Dynamo cache and its recompile limit
        torch._dynamo.reset()
    dim = heads * head_dim
    print(f"## scaling (random Flux, dim {dim}, F1B0; inner {inner}; {repeats}x{per} interleaved calls; "
          f"median, then min)\n")
    print(table(["tokens", "blocks", "cached ms", "ideal ms", "overhead ms", "overhead % of ideal", "cached min ms",
                 "ideal min ms", "overhead min ms", "overhead min %"], rows))
    write_json("scaling", args, {"inner": inner, "dim": dim, "repeats": repeats, "calls_per_sample": per,
                                 "rows": rows, "points": raw})


if __name__ == "__main__":
    main()
