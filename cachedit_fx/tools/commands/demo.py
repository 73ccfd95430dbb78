"""``cachedit-fx demo``: the shipped digits DiT uncached and cached, side by side, timed as a benchmark is:
one warm-up request each, then interleaved repetitions, medians with their spread, and the speedup in
blocks run beside the wall-clock one."""
from __future__ import annotations

import copy
import math
import statistics
import time

from .common import check_out_dir, quiet_libraries


def _digit_grid(images, labels, side: int):
    """The digits as one grid array (a column per class, upscaled to ``side`` pixels, nearest) and the
    x positions of the columns' centres."""
    import numpy as np

    per_class = [[im[0] for im, y in zip(images, labels) if y == d] for d in sorted(set(labels))]
    rows, pitch = max(len(c) for c in per_class), side + max(1, side // 16)
    grid = np.ones((rows * pitch - pitch + side, len(per_class) * pitch - pitch + side))
    scale = side // images.shape[-1]
    for col, column in enumerate(per_class):
        for row, im in enumerate(column):
            grid[row * pitch:row * pitch + side, col * pitch:col * pitch + side] = np.kron(np.asarray(im),
                                                                                           np.ones((scale, scale)))
    return grid, [col * pitch + side / 2 for col in range(len(per_class))]


def _save_demo_png(path, base, cached, labels, chains, threshold, side, titles) -> None:
    from ...runtime.stats import draw_diffs, pyplot

    plt = pyplot()
    rows = math.ceil(len(labels) / len(set(labels)))
    fig = plt.figure(figsize=(12, 4 + rows))  # each grid is ~half the width: 10 digits across, rows down
    spec = fig.add_gridspec(2, 2, height_ratios=[0.3 + rows * 0.6, 3])
    for col, (images, title) in enumerate(zip((base, cached), titles)):
        ax = fig.add_subplot(spec[0, col])
        grid, centres = _digit_grid(images, labels, side)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(centres, sorted(set(labels)))
        ax.set_yticks([])
    draw_diffs(fig.add_subplot(spec[1, :]), chains, threshold)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _blocks_run(stats) -> tuple[int, int]:
    """(blocks an uncached request runs, blocks the cached request ran) over the cached chains: a computed
    call runs every block of the chain, a cached call its Fn and Bn blocks only."""
    uncached = cached = 0
    for s in stats:
        if s.unmatched:
            continue
        calls, skipped = len(s.gates) + len(s.cfg_gates), len(s.cached_steps) + len(s.cfg_cached_steps)
        uncached += calls * s.n_blocks
        cached += (calls - skipped) * s.n_blocks + skipped * (s.Fn + s.Bn)
    return uncached, cached


def _interleaved(generate, transformers: dict, reps: int) -> dict:
    """One untimed request per transformer (the warm-up: it compiles), then ``reps`` rounds of one timed
    request each, in turn (A B A B ...: load that drifts hits both alike). Returns, per name, the first
    timed request's images and every request's seconds."""
    for transformer in transformers.values():
        generate(transformer)
    runs = {name: (None, []) for name in transformers}
    for _ in range(reps):
        for name, transformer in transformers.items():
            images, seconds = generate(transformer)
            runs[name] = (images if runs[name][0] is None else runs[name][0], runs[name][1] + [seconds])
    return runs


def _spread(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.3f}s ({min(seconds):.3f}-{max(seconds):.3f})"


def run(args) -> int:
    import torch

    from ...config import DBCacheConfig
    from ...digits import load_digits_pipeline
    from ...digits.classifier import DigitClassifier
    from ...install.api import enable_cache, summary
    from ...install.hook import cache_hook
    from ...runtime.stats import collect
    from ..metrics import batch_ssim, psnr

    if args.steps < 1 or args.rows < 1 or args.size < 8 or args.size % 8 or args.reps < 1:
        raise ValueError(f"--steps, --rows and --reps must be >= 1 and --size a multiple of 8, got --steps "
                         f"{args.steps} --rows {args.rows} --reps {args.reps} --size {args.size}")
    check_out_dir(args.out)
    torch.set_num_threads(args.threads) if args.threads else None
    with quiet_libraries():
        pipe = load_digits_pipeline()
    labels = [d for _ in range(args.rows) for d in range(10)]
    print(f"digits DiT (trained Flux transformer, shipped), {len(labels)} digits, {args.steps} steps, CFG "
          f"{args.guidance:g} (cond + uncond calls), inner={args.inner}")

    def generate(transformer):
        pipe.transformer = transformer
        started = time.perf_counter()
        images = pipe(labels=labels, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
        return images, time.perf_counter() - started

    uncached = copy.deepcopy(pipe.transformer)  # the same weights, never cached
    if args.inner != "eager":
        uncached = torch.compile(uncached, backend=args.inner, dynamic=False)
    enable_cache(pipe, cache_config=DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=args.threshold, max_warmup_steps=args.warmup),
        inner=args.inner)
    runs = _interleaved(generate, {"uncached": uncached, "cached": pipe.transformer}, args.reps)
    (base, times_base), (cached, times_cached) = runs["uncached"], runs["cached"]
    t_base, t_cached = statistics.median(times_base), statistics.median(times_cached)
    ratios = [b / c for b, c in zip(times_base, times_cached)]
    stats = summary(pipe, logging=False)  # the last request: a cached one
    n_cached = sum(len(s.cached_steps) for s in stats)
    n_cfg_cached = sum(len(s.cfg_cached_steps) for s in stats)
    blocks_base, blocks_cached = _blocks_run(stats)
    classifier = DigitClassifier()
    acc_base, acc_cached = classifier.accuracy(base, labels), classifier.accuracy(cached, labels)
    psnr, ssim = psnr(base, cached, data_range=1.0), batch_ssim(base, cached)
    chains = collect(cache_hook(pipe.transformer).handle)
    _save_demo_png(args.out, base, cached, labels, chains, args.threshold, args.size,
                   (f"uncached: {t_base:.2f} s (median of {args.reps})\nclassifier accuracy {acc_base:.0%}",
                    f"cached (F1B0, threshold {args.threshold:g}): {t_cached:.2f} s, {n_cached}+{n_cfg_cached}/"
                    f"{2 * args.steps} calls cached\nclassifier accuracy {acc_cached:.0%}, PSNR {psnr:.1f} dB"))
    print(f"uncached {t_base:.3f}s  cached {t_cached:.3f}s  speedup {t_base / t_cached:.2f}x  "
          f"cached steps {n_cached}/{args.steps} (uncond {n_cfg_cached}/{args.steps})  "
          f"PSNR {psnr:.2f} dB  SSIM {ssim:.4f}")
    print(f"timing: medians of {args.reps} interleaved repetitions after a warm-up (min-max): uncached "
          f"{_spread(times_base)}  cached {_spread(times_cached)}  speedup per repetition "
          f"{min(ratios):.2f}-{max(ratios):.2f}x")
    print(f"blocks run: uncached {blocks_base}  cached {blocks_cached}  speedup in blocks "
          f"{blocks_base / max(blocks_cached, 1):.2f}x (wall-clock {t_base / t_cached:.2f}x)")
    print(f"classifier accuracy: uncached {acc_base:.1%}  cached {acc_cached:.1%}")
    print(f"wrote {args.out} (top: uncached | cached digits, bottom: per-step residual diffs)")
    return 0 if n_cached > 0 else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate digits with the shipped trained DiT uncached and cached; print "
                                    "speedup, cached steps, PSNR / SSIM and classifier accuracy",
                       description="Generate a grid of digits (a column per class) with the small class-conditioned "
                                   "Flux DiT shipped in the package (trained on scikit-learn's digits), uncached and "
                                   "cached (DBCache F1B0, separate CFG), one warm-up request each and then --reps "
                                   "interleaved ones; print the median times with their spread, the speedup "
                                   "(wall-clock, and in transformer blocks run), cached steps, PSNR / SSIM against "
                                   "uncached and a digit classifier's accuracy both ways, and write one PNG: "
                                   "both grids and the per-step residual diffs.")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--rows", type=int, default=4, help="digits per class")
    p.add_argument("--size", type=int, default=32, help="pixels per digit in the PNG (multiple of 8; the model "
                                                        "draws 8x8)")
    p.add_argument("--threshold", type=float, default=0.12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inner", choices=("inductor", "aot_eager", "eager"), default="inductor")
    p.add_argument("--reps", type=int, default=5, help="timed requests of each, interleaved, after one warm-up "
                                                       "request each (default 5); the times printed are medians")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    p.add_argument("--out", default="cachedit_demo.png")
    p.set_defaults(func=run)
