"""Fidelity at equal work on a trained model: the shipped digits DiT (cachedit_fx.digits). Every indicator
x calibrator cell of cachedit-fx, plus cache-dit 1.5.3's and diffusers 0.42's own runs, each with its
threshold searched to about the same number of cached transformer calls (~40 %, ~70 % and ~85 % of the
request's calls), then PSNR / SSIM against the uncached images, the digit classifier's accuracy, the
transformer blocks run, and the wall time.

    python benchmarks/fidelity.py [--quick] [--steps N] [--per-class N] [--trials N] [--repeats N]

Cells: indicators DBCache F1B0 (warmup 2), FirstBlockCache (diffusers' rule: against the last computed
step, no warmup) and MagCache (accumulated error of calibrated magnitude ratios; skips every block) x
calibrators none, TaylorSeer order 1, FoCa, DMD (history 6). Peers: cache-dit 1.5.3 DBCache F1B0 with no
calibrator / TaylorSeer / FoCa / DMD, diffusers' FirstBlockCache and MagCache hooks (skipped when not
installed). MagCache (ours and diffusers') uses ratios from its own calibration run on the cond branch,
``retention_ratio=0.07`` and ``max_skip_steps=12`` (diffusers' defaults 0.2 / 3 cap it at ~60 % cached).
Everything runs eager (cachedit-fx with ``compile=False``), separate CFG (cond and uncond calls each keep
a state). Wall: the median of interleaved runs against the uncached pipeline; the Inductor path's wall
time is benchmarks/end_to_end.py's and peers.py's job.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import sys
import time

import torch

from _common import first_block_cache, parse_args, table, write_json
import cachedit_fx
from cachedit_fx.digits import load_digits_pipeline
from cachedit_fx.digits.classifier import DigitClassifier
from cachedit_fx.tools.metrics import batch_ssim, psnr

WARMUP = 2
GUIDANCE = 2.0
N_BLOCKS = 8  # the digits transformer: 2 double + 6 single blocks, one chain
MAG = dict(retention_ratio=0.07, max_skip_steps=12)
CALIBRATORS = {
    "": lambda lib: None,
    " + TaylorSeer O1": lambda lib: lib.TaylorSeerCalibratorConfig(taylorseer_order=1),
    " + FoCa": lambda lib: lib.FoCaCalibratorConfig(),
    " + DMD": lambda lib: lib.DMDCalibratorConfig(),
}


class Run:
    """One method at one threshold: its pipeline, how many calls its last request cached, and how many
    blocks a computed / cached call runs (Fn)."""

    def __init__(self, pipe, cached, fn: int):
        self.pipe, self.cached, self.fn = pipe, cached, fn


def _ours_cached(pipe):
    return lambda: sum(len(s.cached_steps) + len(s.cfg_cached_steps) for s in cachedit_fx.summary(pipe, logging=False))


def ours(indicator: str, calibrator: str, steps: int, ratios: list[float]):
    def make(threshold):
        cache = {
            "DBCache F1B0": lambda: cachedit_fx.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=WARMUP),
            "FirstBlockCache": lambda: cachedit_fx.FirstBlockCacheConfig(threshold=threshold),
            "MagCache": lambda: cachedit_fx.MagCacheConfig(threshold=threshold, num_inference_steps=steps,
                                                           mag_ratios=ratios, **MAG),
        }[indicator]()
        pipe = cachedit_fx.enable_cache(load_digits_pipeline(), compile=False, cache_config=cache,
                                        calibrator_config=CALIBRATORS[calibrator](cachedit_fx))
        return Run(pipe, _ours_cached(pipe), 0 if indicator == "MagCache" else 1)
    return make


def our_ratios(generate, steps: int) -> list[float]:
    """MagCache's calibration run (ours): the cond branch's per-step magnitude ratios."""
    pipe = cachedit_fx.enable_cache(load_digits_pipeline(), compile=False,
                                    cache_config=cachedit_fx.MagCacheConfig(num_inference_steps=steps, calibrate=True))
    generate(pipe)
    return cachedit_fx.summary(pipe, logging=False)[0].mag_ratios


def cache_dit_method(calibrator: str):
    def make(threshold):
        import cache_dit

        pipe = load_digits_pipeline()
        cache_dit.enable_cache(pipe.transformer, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=WARMUP,
            enable_separate_cfg=True), calibrator_config=CALIBRATORS[calibrator](cache_dit))
        t = pipe.transformer

        def cached():
            ctx = t._context_manager.get_context(t._context_names[-1])
            return len(ctx.cached_steps) + len(ctx.cfg_cached_steps)
        return Run(pipe, cached, 1)
    return make


def _consumed(log: list):
    def cached():
        n = sum(1 for computed in log if not computed)
        log.clear()  # the hooks append across calls: count one request at a time
        return n
    return cached


def fbc_method(threshold):
    pipe = load_digits_pipeline()
    return Run(pipe, _consumed(first_block_cache(pipe.transformer, threshold)), 1)


def diffusers_mag_ratios(generate, steps: int) -> list[float]:
    """diffusers' MagCache calibration run: the ratios it prints for the cond branch (printed first)."""
    from diffusers.hooks import MagCacheConfig

    pipe = load_digits_pipeline()
    pipe.transformer.enable_cache(MagCacheConfig(num_inference_steps=steps, calibrate=True))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate(pipe)
    lists = [ln for ln in printed.getvalue().splitlines() if ln.strip().startswith("[") and "MagCache" not in ln]
    return [float(x) for x in lists[0].strip(" []").split(",")]


def diffusers_mag(steps: int, ratios: list[float]):
    def make(threshold):
        from diffusers.hooks import MagCacheConfig

        pipe = load_digits_pipeline()
        t = pipe.transformer
        t.enable_cache(MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=ratios, **MAG))
        head = t.transformer_blocks[0]._diffusers_hook.get_hook("mag_cache_leader_block_hook")
        log: list[bool] = []
        # runs inside the pipeline's cache_context, where the branch's state is readable
        t.register_forward_hook(lambda *_: log.append(bool(head.state_manager.get_state().should_compute)))
        return Run(pipe, _consumed(log), 0)
    return make


def methods(generate, steps: int) -> dict:
    ratios = our_ratios(generate, steps)
    found = {f"cachedit-fx {ind}{cal}": ours(ind, cal, steps, ratios)
             for ind in ("DBCache F1B0", "FirstBlockCache", "MagCache") for cal in CALIBRATORS}
    try:
        import cache_dit  # noqa: F401

        os.environ.setdefault("CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", "1")
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("cache_dit"):
                logging.getLogger(name).setLevel(logging.ERROR)
        found.update({f"cache-dit 1.5.3 DBCache F1B0{cal}": cache_dit_method(cal) for cal in CALIBRATORS})
    except ImportError:
        pass
    found["diffusers FirstBlockCache"] = fbc_method
    found["diffusers MagCache"] = diffusers_mag(steps, diffusers_mag_ratios(generate, steps))
    return found


def search(make, generate, target: int, trials: int, memo: dict):
    """Bisect the threshold in [0, 1] towards ``target`` cached calls; ``memo`` (threshold -> trial)
    is shared by a method's targets. Returns the trial closest to the target."""
    lo, hi, best = 0.0, 1.0, None
    for _ in range(trials):
        threshold = (lo + hi) / 2
        if threshold not in memo:
            run = make(threshold)
            images, _ = generate(run.pipe)
            memo[threshold] = (threshold, run.cached(), run, images)
        trial = memo[threshold]
        if best is None or abs(trial[1] - target) < abs(best[1] - target):
            best = trial
        if abs(trial[1] - target) <= 1:
            break
        lo, hi = (threshold, hi) if trial[1] < target else (lo, threshold)
    return best


def main():
    def options(p):
        p.add_argument("--steps", type=int, default=None, help="inference steps (default 28; --quick 8)")
        p.add_argument("--per-class", type=int, default=None, help="digits per class (default 5; --quick 1)")
        p.add_argument("--trials", type=int, default=None, help="threshold trials per target (default 8; --quick 1)")
        p.add_argument("--repeats", type=int, default=None, help="interleaved timed runs (default 3; --quick 1)")

    args = parse_args("fidelity", options)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # a pipeline is loaded per trial
    diffusers_logging.set_verbosity_error()
    defaults = (8, 1, 1, 1) if args.quick else (28, 5, 8, 3)
    given = (args.steps, args.per_class, args.trials, args.repeats)
    steps, per_class, trials, repeats = (d if g is None else g for g, d in zip(given, defaults))
    labels = [d for _ in range(per_class) for d in range(10)]
    calls = 2 * steps
    fractions = (0.4,) if args.quick else (0.4, 0.7, 0.85)
    targets = [round(f * calls) for f in fractions]

    def generate(pipe):
        started = time.perf_counter()
        images = pipe(labels=labels, num_inference_steps=steps, guidance_scale=GUIDANCE,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
        return images, time.perf_counter() - started

    classifier = DigitClassifier()
    plain = load_digits_pipeline()
    reference, _ = generate(plain)
    rows, tuning, runs = [], {}, {"uncached": Run(plain, None, N_BLOCKS)}
    for method, make in methods(generate, steps).items():
        memo: dict = {}
        for target in targets:
            threshold, n, run, images = search(make, generate, target, trials, memo)
            name = f"{method} @ {target}"
            runs[name] = run
            run_blocks = calls * N_BLOCKS - n * (N_BLOCKS - run.fn)
            rows.append({"method": method, "target": f"{target}/{calls}", "threshold": threshold,
                         "cached calls": f"{n}/{calls}", "blocks run": f"{run_blocks}/{calls * N_BLOCKS}",
                         "PSNR dB": psnr(reference, images, data_range=1.0), "SSIM": batch_ssim(reference, images),
                         "accuracy": classifier.accuracy(images, labels), "run": name})
        tuning[method] = sorted((t, n) for t, n, _, _ in memo.values())
    timings = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so load drift hits every method
        for name, run in runs.items():
            timings[name].append(generate(run.pipe)[1])
            if run.cached is not None:
                run.cached()
    base = statistics.median(timings["uncached"])
    for row in rows:
        row["speedup (wall)"] = base / statistics.median(timings[row.pop("run")])
    rows.sort(key=lambda r: (int(r["target"].split("/")[0]), -r["PSNR dB"]))
    rows.insert(0, {"method": "uncached", "target": "-", "threshold": "-", "cached calls": f"0/{calls}",
                    "blocks run": f"{calls * N_BLOCKS}/{calls * N_BLOCKS}", "PSNR dB": "inf", "SSIM": 1.0,
                    "accuracy": classifier.accuracy(reference, labels), "speedup (wall)": 1.0})
    print(f"## fidelity (digits DiT: trained FluxTransformer2DModel, {N_BLOCKS} blocks; {len(labels)} digits, "
          f"{steps} steps, CFG {GUIDANCE:g} as separate cond + uncond calls; each method's threshold bisected "
          f"to ~{' / ~'.join(f'{t}/{calls}' for t in targets)} cached calls; rows by target, then PSNR; "
          f"wall: median of {repeats} interleaved runs, eager)\n")
    print(table(["method", "target", "threshold", "cached calls", "blocks run", "speedup (wall)", "PSNR dB", "SSIM",
                 "accuracy"], rows))
    write_json("fidelity", args, {"argv": sys.argv[1:], "steps": steps, "labels": labels, "target_cached_calls": targets, "rows": rows,
                                  "tuning": tuning, "timings_s": timings})


if __name__ == "__main__":
    main()
