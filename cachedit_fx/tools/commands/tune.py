"""``cachedit-fx tune``: the threshold for a target speedup or PSNR floor on the shipped digits DiT."""
from __future__ import annotations

import json

from .common import check_out_dir, quiet_libraries


def run(args) -> int:
    import torch

    from ...config import DBCacheConfig
    from ...digits import load_digits_pipeline
    from ...digits.classifier import DigitClassifier
    from ...install.api import enable_cache
    from ..tune import tune

    if args.steps < 1 or args.rows < 1:
        raise ValueError(f"--steps and --rows must be >= 1, got --steps {args.steps} --rows {args.rows}")
    if args.methods:
        _check_methods_args(args)
    if args.plot:
        check_out_dir(args.plot)
    torch.set_num_threads(args.threads) if args.threads else None
    with quiet_libraries():
        pipe = load_digits_pipeline()
    labels = [d for _ in range(args.rows) for d in range(10)]
    dbcache = DBCacheConfig(Fn_compute_blocks=args.fn, Bn_compute_blocks=0, max_warmup_steps=args.warmup)
    call_kwargs = dict(labels=labels, num_inference_steps=args.steps, guidance_scale=args.guidance,
                       generator=torch.Generator().manual_seed(args.seed), output_type="pt")
    classifier = DigitClassifier()
    score = dict(score=lambda out: classifier.accuracy(out.images, labels), score_name="accuracy")
    if args.methods:
        return _run_methods(args, pipe, call_kwargs, dbcache, score, len(labels))
    enable_cache(pipe, cache_config=dbcache, inner=args.inner)
    print(f"tune: digits DiT, {len(labels)} digits, {args.steps} steps, CFG {args.guidance:g}, F{args.fn}B0, "
          f"warmup {args.warmup}, inner={args.inner}")
    result = tune(pipe, call_kwargs, target_speedup=args.target_speedup, min_psnr=args.min_psnr,
                  max_trials=args.trials, max_threshold=args.max_threshold, plot=args.plot, **score)
    if args.json:
        print(json.dumps({"reached": result.reached, "message": result.message,
                          "graphs_compiled": result.graphs_compiled,
                          "chosen": None if result.chosen is None else result.chosen.threshold,
                          "trials": [vars(t) for t in result.trials]}, indent=2, default=str))
    else:
        print(result.table())
        print(f"{'reached' if result.reached else 'not reached'}: {result.message}; "
              f"graphs compiled during the trials: {result.graphs_compiled}")
        if args.plot:
            print(f"wrote {args.plot}")
    return 0 if result.reached else 1


def _check_methods_args(args) -> None:
    from ..tune_methods import parse_methods

    parse_methods(args.methods)  # an unknown name fails before the model loads
    if args.target_speedup is None and args.min_psnr is None:
        raise ValueError("--methods needs --target-speedup and / or --min-psnr (the method is chosen by them)")
    if args.plot:
        raise ValueError("--plot draws one method's frontier; leave it out with --methods")


def _run_methods(args, pipe, call_kwargs: dict, dbcache, score: dict, n_digits: int) -> int:
    """``--methods``: every cell installed once, its threshold tuned; the winner's row marked."""
    from ...install.api import strify
    from ..tune_methods import tune_methods

    print(f"tune: digits DiT, {n_digits} digits, {args.steps} steps, CFG {args.guidance:g}, methods {args.methods} "
          f"(DBCache F{args.fn}B0 warmup {args.warmup}), inner={args.inner}")
    result = tune_methods(pipe, call_kwargs, methods=args.methods, target_speedup=args.target_speedup,
                          min_psnr=args.min_psnr, dbcache=dbcache, inner=args.inner, max_trials=args.trials,
                          max_threshold=args.max_threshold, **score)
    if args.json:
        print(json.dumps({"winner": None if result.winner is None else result.winner.cell.name,
                          "message": result.message, "installed": strify(pipe),
                          "cells": [{"method": c.cell.name, "skipped": c.cell.skipped, "reached": c.reached,
                                     "graphs_compiled": None if c.result is None else c.result.graphs_compiled,
                                     "chosen": None if c.chosen is None else vars(c.chosen)}
                                    for c in result.cells]}, indent=2, default=str))
    else:
        print(result.table())
        print(f"{'winner' if result.winner else 'not reached'}: {result.message}; installed: {strify(pipe)}")
    return 0 if result.winner is not None else 1


def register(sub) -> None:
    p = sub.add_parser("tune", help="pick residual_diff_threshold for a target speedup or PSNR floor on the "
                                    "shipped digits DiT (no recompile between trials)",
                       description="Calibrate the threshold on the shipped digits DiT: a few pipeline calls, each with "
                                   "a threshold loaded into the compiled graph's state (no recompile), bisected to "
                                   "--target-speedup (counted in transformer blocks run) and / or --min-psnr against "
                                   "the uncached images; prints the frontier (threshold, cached calls, speedup, PSNR, "
                                   "classifier accuracy). Exit 1 when the target is not reached. Without a target: a "
                                   "sweep.")
    p.add_argument("--target-speedup", type=float, default=None)
    p.add_argument("--methods", default=None,
                   help="search the method too: 'all' or a comma-separated list of indicator[+calibrator] "
                        "(dbcache, first_block, magcache x taylorseer, foca, dmd), each installed once")
    p.add_argument("--min-psnr", type=float, default=None, help="dB against the uncached images")
    p.add_argument("--trials", type=int, default=8, help="calibration calls after the uncached reference")
    p.add_argument("--max-threshold", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--rows", type=int, default=2, help="digits per class in each calibration call")
    p.add_argument("--fn", type=int, default=1, help="Fn_compute_blocks")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inner", choices=("inductor", "aot_eager", "eager"), default="eager",
                   help="the decisions do not depend on it; eager starts fastest")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default=None, help="write the frontier plot (PNG)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
