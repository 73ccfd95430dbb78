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
    if args.plot:
        check_out_dir(args.plot)
    torch.set_num_threads(args.threads) if args.threads else None
    with quiet_libraries():
        pipe = load_digits_pipeline()
    labels = [d for _ in range(args.rows) for d in range(10)]
    enable_cache(pipe, cache_config=DBCacheConfig(
        Fn_compute_blocks=args.fn, Bn_compute_blocks=0, max_warmup_steps=args.warmup), inner=args.inner)
    classifier = DigitClassifier()
    print(f"tune: digits DiT, {len(labels)} digits, {args.steps} steps, CFG {args.guidance:g}, F{args.fn}B0, "
          f"warmup {args.warmup}, inner={args.inner}")
    result = tune(
        pipe, dict(labels=labels, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=torch.Generator().manual_seed(args.seed), output_type="pt"),
        target_speedup=args.target_speedup, min_psnr=args.min_psnr, max_trials=args.trials,
        max_threshold=args.max_threshold, score=lambda out: classifier.accuracy(out.images, labels),
        score_name="accuracy", plot=args.plot)
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
