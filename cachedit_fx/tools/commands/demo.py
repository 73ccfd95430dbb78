"""``cachedit-fx demo``: the shipped digits DiT uncached and cached, side by side."""
from __future__ import annotations

import math
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


def run(args) -> int:
    import torch

    from ...config import DBCacheConfig
    from ...digits import load_digits_pipeline
    from ...digits.classifier import DigitClassifier
    from ...install.api import enable_cache, summary
    from ...install.hook import cache_hook
    from ...runtime.stats import collect
    from ..metrics import batch_ssim, psnr

    if args.steps < 1 or args.rows < 1 or args.size < 8 or args.size % 8:
        raise ValueError(f"--steps and --rows must be >= 1 and --size a multiple of 8, got --steps {args.steps} "
                         f"--rows {args.rows} --size {args.size}")
    check_out_dir(args.out)
    torch.set_num_threads(args.threads) if args.threads else None
    with quiet_libraries():
        pipe = load_digits_pipeline()
    labels = [d for _ in range(args.rows) for d in range(10)]
    print(f"digits DiT (trained Flux transformer, shipped), {len(labels)} digits, {args.steps} steps, CFG "
          f"{args.guidance:g} (cond + uncond calls), inner={args.inner}")

    def generate():
        started = time.perf_counter()
        images = pipe(labels=labels, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
        return images, time.perf_counter() - started

    if args.inner != "eager":
        pipe.transformer = torch.compile(pipe.transformer, backend=args.inner, dynamic=False)
    generate()  # warm-up / compile
    base, t_base = generate()
    if args.inner != "eager":
        pipe.transformer = pipe.transformer._orig_mod
    enable_cache(pipe, cache_config=DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=args.threshold, max_warmup_steps=args.warmup),
        inner=args.inner)
    generate()  # compile
    cached, t_cached = generate()
    stats = summary(pipe, logging=False)
    n_cached = sum(len(s.cached_steps) for s in stats)
    n_cfg_cached = sum(len(s.cfg_cached_steps) for s in stats)
    classifier = DigitClassifier()
    acc_base, acc_cached = classifier.accuracy(base, labels), classifier.accuracy(cached, labels)
    psnr, ssim = psnr(base, cached, data_range=1.0), batch_ssim(base, cached)
    chains = collect(cache_hook(pipe.transformer).handle)
    _save_demo_png(args.out, base, cached, labels, chains, args.threshold, args.size,
                   (f"uncached: {t_base:.2f} s\nclassifier accuracy {acc_base:.0%}",
                    f"cached (F1B0, threshold {args.threshold:g}): {t_cached:.2f} s, {n_cached}+{n_cfg_cached}/"
                    f"{2 * args.steps} calls cached\nclassifier accuracy {acc_cached:.0%}, PSNR {psnr:.1f} dB"))
    print(f"uncached {t_base:.3f}s  cached {t_cached:.3f}s  speedup {t_base / t_cached:.2f}x  "
          f"cached steps {n_cached}/{args.steps} (uncond {n_cfg_cached}/{args.steps})  "
          f"PSNR {psnr:.2f} dB  SSIM {ssim:.4f}")
    print(f"classifier accuracy: uncached {acc_base:.1%}  cached {acc_cached:.1%}")
    print(f"wrote {args.out} (top: uncached | cached digits, bottom: per-step residual diffs)")
    return 0 if n_cached > 0 else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate digits with the shipped trained DiT uncached and cached; print "
                                    "speedup, cached steps, PSNR / SSIM and classifier accuracy",
                       description="Generate a grid of digits (a column per class) with the small class-conditioned "
                                   "Flux DiT shipped in the package (trained on scikit-learn's digits), uncached and "
                                   "cached (DBCache F1B0, separate CFG); print the speedup, cached steps, PSNR / SSIM "
                                   "against uncached and a digit classifier's accuracy both ways, and write one PNG: "
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
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    p.add_argument("--out", default="cachedit_demo.png")
    p.set_defaults(func=run)
