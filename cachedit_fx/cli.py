"""``cachedit-fx`` command line: demo | diff."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _psnr(a, b) -> float:
    import torch

    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def _save_side_by_side(a, b, path: str) -> None:
    import numpy as np
    from PIL import Image

    def to_uint8(x):
        x = x[0] if x.dim() == 4 else x
        return (x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    Image.fromarray(np.concatenate([to_uint8(a), to_uint8(b)], axis=1)).resize(
        (a.shape[-1] * 4, a.shape[-2] * 2), Image.NEAREST).save(path)


def demo(args) -> int:
    import torch

    import cachedit_fx
    from cachedit_fx.testing import zoo

    torch.set_num_threads(args.threads) if args.threads else None
    pipe = zoo.build_pipeline("flux")
    kwargs = dict(height=args.size, width=args.size)
    steps = args.steps
    print(f"tiny Flux (random weights, offline), {args.size}x{args.size}, {steps} steps, inner={args.inner}")
    if args.inner != "eager":
        pipe.transformer = torch.compile(pipe.transformer, backend=args.inner, dynamic=False)
    zoo.run_pipeline(pipe, "flux", num_inference_steps=steps, **kwargs)  # warm-up / compile
    t0 = time.perf_counter()
    base = zoo.run_pipeline(pipe, "flux", num_inference_steps=steps, **kwargs)
    t_base = time.perf_counter() - t0
    if args.inner != "eager":
        pipe.transformer = pipe.transformer._orig_mod
    cachedit_fx.enable_cache(pipe, cache_config=cachedit_fx.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=args.threshold, max_warmup_steps=args.warmup),
        inner=args.inner)
    zoo.run_pipeline(pipe, "flux", num_inference_steps=steps, **kwargs)  # compile
    t0 = time.perf_counter()
    cached = zoo.run_pipeline(pipe, "flux", num_inference_steps=steps, **kwargs)
    t_cached = time.perf_counter() - t0
    rows = cachedit_fx.summary(pipe)
    n_cached = sum(r.get("cached_steps", 0) for r in rows)
    psnr = _psnr(base, cached)
    _save_side_by_side(base, cached, args.out)
    print(f"uncached {t_base:.3f}s  cached {t_cached:.3f}s  speedup {t_base / t_cached:.2f}x  "
          f"cached steps {n_cached}/{steps}  PSNR {psnr:.2f} dB")
    print(f"wrote {args.out} (left: uncached, right: cached)")
    return 0 if n_cached > 0 else 1


def diff(args) -> int:
    from cachedit_fx.diff import describe, load_model, render_text

    try:
        transformer, inputs = load_model(args.model)
        report = describe(transformer, inputs, fn=args.fn, bn=args.bn)
    except (ValueError, FileNotFoundError) as e:
        print(f"cachedit-fx diff: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        text = json.dumps(report, indent=2)
    else:
        text = render_text(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cachedit-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a tiny Flux uncached and cached; print speedup, cached steps, PSNR")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (multiple of 16)")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--inner", choices=("inductor", "aot_eager", "eager"), default="inductor")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="cachedit_demo.png")
    p.set_defaults(func=demo)
    p = sub.add_parser("diff", help="show what the passes do to a model's graph")
    p.add_argument("model", help="a zoo model name (e.g. flux, wan)")
    p.add_argument("--fn", type=int, default=1, help="Fn_compute_blocks")
    p.add_argument("--bn", type=int, default=0, help="Bn_compute_blocks")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--out")
    p.set_defaults(func=diff)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
