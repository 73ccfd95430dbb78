"""``cachedit-fx trace``: a tiny cached denoising loop and its per-step decision table."""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter

from .common import NothingCached, add_cache_args, add_model_args, check_out_dir, quiet_libraries


def _denoise_cached(model, cache, calib, steps: int, uncond):
    """enable_cache on the bare transformer (eager inner: the same install, islands included, as users
    get), a hand-written Euler loop, and the install's graphs; returns (graphs, per-branch timesteps,
    seconds)."""
    import torch

    from ... import zoo
    from ...install.api import disable_cache, enable_cache
    from ...install.hook import cache_hook

    fam, transformer = model.family, model.transformer
    n_branches = 2 if uncond is not None else 1
    enable_cache(transformer, cache, calib, compile=False)
    handle = cache_hook(transformer).handle
    timesteps: list[list[float]] = [[] for _ in range(n_branches)]
    n_calls = [0]

    def call(**kwargs):
        b = n_calls[0] % n_branches
        n_calls[0] += 1
        t = kwargs.get(fam.timestep_arg)
        timesteps[b].append(float(torch.as_tensor(t).reshape(-1)[0]) if t is not None else math.nan)
        # Name the CFG branch, as pipelines do: cond and uncond calls may compile to different graphs
        # (different text lengths), each with its own state, so alternation alone cannot tell them.
        named = n_branches == 2 and hasattr(transformer, "cache_context")
        with transformer.cache_context(("cond", "uncond")[b]) if named else contextlib.nullcontext():
            return transformer(**kwargs)

    t0 = time.perf_counter()
    try:
        with quiet_libraries():  # also the backend's "caching disabled" warnings: listed below as notes
            zoo.denoise(transformer, fam, model.inputs, num_steps=steps, uncond=uncond, call=call)
        graphs = list(handle.graphs)  # disable_cache drops them
    finally:
        disable_cache(transformer)
    return graphs, timesteps, time.perf_counter() - t0


def _chains(per_graph, timesteps, n_branches: int, threshold: float) -> list[dict]:
    """One entry per graph's chain and branch, with a row per step."""
    names = {0: "cond", 1: "uncond"} if n_branches == 2 else {0: "-"}
    per_branch = Counter(s.branch for _, s in per_graph)  # graphs serving each branch
    clash = Counter((s.chain, s.branch) for _, s in per_graph)
    chains = []
    for k, s in per_graph:
        ts = timesteps[s.branch] if s.branch < n_branches else []
        rows = [{"step": i, "branch": names.get(s.branch, str(s.branch)),
                 "timestep": ts[i] if i < len(ts) and per_branch[s.branch] == 1 else None,
                 "diff": s.diffs[i] if math.isfinite(s.diffs[i]) and s.diffs[i] >= 0 else None,
                 "threshold": threshold, "gate": s.gates[i], "cached": bool(s.cached[i])} for i in range(s.steps)]
        chain = s.chain if clash[(s.chain, s.branch)] == 1 else f"{s.chain} (graph {k})"
        chains.append({"chain": chain, "pattern": s.pattern, "n_blocks": s.n_blocks, "Fn": s.fn, "Bn": s.bn,
                       "branch": names.get(s.branch, str(s.branch)), "steps": s.steps,
                       "cached_steps": s.n_cached, "rows": rows})
    return chains


def _print_table(chains: list[dict]) -> None:
    for c in {c["chain"]: c for c in chains}.values():
        print(f"chain {c['chain']}  pattern {c['pattern']}  {c['n_blocks']} blocks  "
              f"Fn {c['Fn']} | middle | Bn {c['Bn']}")
    multi = len({c["chain"] for c in chains}) > 1
    header = (f"{'step':>4}  {'branch':<6}  {'timestep':>9}  {'diff':>8}  {'threshold':>9}  {'gate':<27}  cached"
              + ("  chain" if multi else ""))
    print(header)
    print("-" * len(header))
    rows = sorted(((r, c) for c in chains for r in c["rows"]), key=lambda rc: (rc[0]["step"], rc[1]["chain"]))
    for r, c in rows:
        ts = "-" if r["timestep"] is None or not math.isfinite(r["timestep"]) else f"{r['timestep']:.4g}"
        diff_s = "-" if r["diff"] is None else f"{r['diff']:.4f}"
        print(f"{r['step']:>4}  {r['branch']:<6}  {ts:>9}  {diff_s:>8}  {r['threshold']:>9.4g}  {r['gate']:<27}  "
              f"{'yes' if r['cached'] else 'no'}" + (f"{'':<{4 if r['cached'] else 5}}{c['chain']}" if multi else ""))
    for c in chains:
        label = [c["chain"]] if multi else []
        label += [] if c["branch"] == "-" else [c["branch"]]
        print(f"cached {c['cached_steps']}/{c['steps']} steps" + (f" ({', '.join(label)})" if label else ""))


def run(args) -> int:
    from ...config import DBCacheConfig, TaylorSeerCalibratorConfig
    from ...runtime.handle import CacheHandle
    from ...runtime.stats import collect, plot_diffs
    from ..models import load_model

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    cache = DBCacheConfig(Fn_compute_blocks=args.fn, Bn_compute_blocks=args.bn,
                          residual_diff_threshold=args.threshold, max_warmup_steps=args.warmup)
    calib = TaylorSeerCalibratorConfig(taylorseer_order=args.taylorseer) if args.taylorseer else None
    if args.plot:
        check_out_dir(args.plot)
    with quiet_libraries():
        model = load_model(args.model, args.config)
    fam = model.family
    uncond = None
    if fam.separate_cfg and fam.uncond_inputs is not None and not args.no_cfg:
        uncond = fam.uncond_inputs(model.transformer, 0)
    n_branches = 2 if uncond is not None else 1
    cache.enable_separate_cfg = n_branches == 2
    graphs, timesteps, elapsed = _denoise_cached(model, cache, calib, args.steps, uncond)
    uncached = [g.unmatched for g in graphs if g.unmatched]
    per_graph = [(k, s) for k, g in enumerate(g for g in graphs if g.chains)
                 for s in collect(CacheHandle(cache, calib, [g])) if s.steps > 0]
    if not per_graph:
        reason = "; ".join(dict.fromkeys(uncached)) or "no graph was compiled"
        raise NothingCached(f"nothing cached for {args.model}: {reason}")
    thr = cache.residual_diff_threshold
    chains = _chains(per_graph, timesteps, n_branches, thr)
    plot = plot_diffs([s for _, s in per_graph], thr, args.plot) if args.plot else None
    if args.format == "json":
        print(json.dumps({"model": args.model, "config": cache.strify(), "seconds": round(elapsed, 3),
                          "uncached_graphs": uncached, "chains": chains, "plot": plot}, indent=2))
        return 0
    print(f"trace {model.label}: {cache.strify()}{'_' + calib.strify() if calib else ''}, {args.steps} steps"
          f"{', separate CFG (cond + uncond calls)' if n_branches == 2 else ''}, inner eager, {elapsed:.2f}s")
    for reason in dict.fromkeys(uncached):
        print(f"note: a graph compiled uncached: {reason}")
    _print_table(chains)
    if plot:
        print(f"wrote {plot}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "trace", help="run a tiny cached denoising loop and print the per-step decision table",
        description="Run a hand-written Euler loop (zoo.denoise) over MODEL's transformer under "
                    "cachedit_fx.enable_cache (compile=False) and print, per step: diff of the Fn residual, threshold, "
                    "the gate that settled the step and whether the middle was cached; write the diff plot. "
                    "Separate-CFG families call the transformer twice per step (cond, uncond).")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    add_cache_args(p, warmup=2)
    p.add_argument("--no-cfg", action="store_true", help="separate-CFG families: call cond only")
    p.add_argument("--plot", default="trace.png", help="diff plot PNG (default trace.png; '' for none)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)
