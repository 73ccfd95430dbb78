"""``cachedit-fx`` command line: demo | tune | diff | trace | metrics | export."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time


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
    from cachedit_fx.stats import draw_diffs, pyplot

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


def demo(args) -> int:
    import torch

    import cachedit_fx
    from cachedit_fx.digits import load_digits_pipeline
    from cachedit_fx.digits.classifier import DigitClassifier
    from cachedit_fx.hook import cache_hook
    from cachedit_fx.metrics import batch_ssim
    from cachedit_fx.stats import collect
    from cachedit_fx.tune import psnr_01

    if args.steps < 1 or args.rows < 1 or args.size < 8 or args.size % 8:
        raise ValueError(f"--steps and --rows must be >= 1 and --size a multiple of 8, got --steps {args.steps} "
                         f"--rows {args.rows} --size {args.size}")
    _check_out_dir(args.out)
    torch.set_num_threads(args.threads) if args.threads else None
    with _quiet_libraries():
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
    cachedit_fx.enable_cache(pipe, cache_config=cachedit_fx.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=args.threshold, max_warmup_steps=args.warmup),
        inner=args.inner)
    generate()  # compile
    cached, t_cached = generate()
    stats = cachedit_fx.summary(pipe, logging=False)
    n_cached = sum(len(s.cached_steps) for s in stats)
    n_cfg_cached = sum(len(s.cfg_cached_steps) for s in stats)
    classifier = DigitClassifier()
    acc_base, acc_cached = classifier.accuracy(base, labels), classifier.accuracy(cached, labels)
    psnr, ssim = psnr_01(base, cached), batch_ssim(base, cached)
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


def tune_cmd(args) -> int:
    import torch

    import cachedit_fx
    from cachedit_fx.digits import load_digits_pipeline
    from cachedit_fx.digits.classifier import DigitClassifier

    if args.steps < 1 or args.rows < 1:
        raise ValueError(f"--steps and --rows must be >= 1, got --steps {args.steps} --rows {args.rows}")
    if args.plot:
        _check_out_dir(args.plot)
    torch.set_num_threads(args.threads) if args.threads else None
    with _quiet_libraries():
        pipe = load_digits_pipeline()
    labels = [d for _ in range(args.rows) for d in range(10)]
    cachedit_fx.enable_cache(pipe, cache_config=cachedit_fx.DBCacheConfig(
        Fn_compute_blocks=args.fn, Bn_compute_blocks=0, max_warmup_steps=args.warmup), inner=args.inner)
    classifier = DigitClassifier()
    print(f"tune: digits DiT, {len(labels)} digits, {args.steps} steps, CFG {args.guidance:g}, F{args.fn}B0, "
          f"warmup {args.warmup}, inner={args.inner}")
    result = cachedit_fx.tune(
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


# ----------------------------------------------------------------------------- diff


class _quiet_libraries:
    """Silence library chatter (transformers / diffusers warnings while the tiny zoo models build,
    deprecation warnings, Dynamo's recompile notes) so stdout is the report and stderr stays for
    this command's own one-line errors."""

    def __enter__(self):
        import logging
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._levels = []
        for name in ("transformers", "diffusers"):
            try:  # configures the library's root logger now, so a later lazy setup cannot reset it
                __import__(f"{name}.utils.logging", fromlist=["get_logger"]).get_logger()
            except ImportError:
                pass
        for name in ("transformers", "diffusers", "torch._dynamo"):
            log = logging.getLogger(name)
            self._levels.append((log, log.level))
            log.setLevel(logging.ERROR)
        from diffusers.utils import logging as diffusers_logging

        self._bars = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components..."
        return self

    def __exit__(self, *exc):
        from diffusers.utils import logging as diffusers_logging

        if self._bars:
            diffusers_logging.enable_progress_bar()
        for log, level in self._levels:
            log.setLevel(level)
        self._warnings.__exit__(*exc)
        return False

DIFF_FORMATS = ("text", "json", "dot", "png", "svg")


def diff(args) -> int:
    from cachedit_fx.models import load_model
    from cachedit_fx.render import render_dot, render_image, render_json, render_text
    from cachedit_fx.report import describe

    fmt = args.format
    if fmt is None:
        ext = os.path.splitext(args.out or "")[1].lstrip(".").lower()
        fmt = ext if ext in DIFF_FORMATS else "text"
    if fmt in ("png", "svg") and args.out and os.path.splitext(args.out)[1].lower() not in ("", f".{fmt}"):
        raise ValueError(f"--out {args.out} does not end in .{fmt}")
    _check_out_dir(args.out)
    with _quiet_libraries():
        model = load_model(args.model, args.config)
        report = describe(model.transformer, model.inputs, fn=args.fn, bn=args.bn, separate_cfg=args.separate_cfg)
    if fmt in ("png", "svg"):
        out = args.out or f"cachedit_diff_{_safe(args.model)}.{fmt}"
        render_image(report, out, fmt, title=model.label)
        print(f"wrote {out}")
        return 0
    if fmt == "json":
        text = render_json(report)
    elif fmt == "dot":
        text = render_dot(report, title=model.label)
    else:
        text = render_text(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(name))).strip("_") or "model"


def _check_out_dir(path: str | None) -> None:
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"output folder does not exist: {folder}")


# ----------------------------------------------------------------------------- trace


def trace(args) -> int:
    import torch

    import cachedit_fx
    from cachedit_fx.config import DBCacheConfig, TaylorSeerCalibratorConfig
    from cachedit_fx.handle import CacheHandle
    from cachedit_fx.hook import cache_hook
    from cachedit_fx.models import load_model
    from cachedit_fx.stats import collect, plot_diffs
    from cachedit_fx.testing import zoo

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    cache = DBCacheConfig(Fn_compute_blocks=args.fn, Bn_compute_blocks=args.bn,
                          residual_diff_threshold=args.threshold, max_warmup_steps=args.warmup)
    calib = TaylorSeerCalibratorConfig(taylorseer_order=args.taylorseer) if args.taylorseer else None
    if args.plot:
        _check_out_dir(args.plot)
    with _quiet_libraries():
        model = load_model(args.model, args.config)
    fam = model.family
    uncond = None
    if fam.separate_cfg and fam.uncond_inputs is not None and not args.no_cfg:
        uncond = fam.uncond_inputs(model.transformer, 0)
    n_branches = 2 if uncond is not None else 1
    cache.enable_separate_cfg = n_branches == 2
    transformer = model.transformer
    # enable_cache on the bare transformer (eager inner): the same install, islands included, as users get.
    cachedit_fx.enable_cache(transformer, cache, calib, compile=False)
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
        with _quiet_libraries():  # also the backend's "caching disabled" warnings: listed below as notes
            zoo.denoise(transformer, fam, model.inputs, num_steps=args.steps, uncond=uncond, call=call)
        graphs = list(handle.graphs)  # disable_cache drops them
    finally:
        cachedit_fx.disable_cache(transformer)
    elapsed = time.perf_counter() - t0
    uncached = [g.unmatched for g in graphs if g.unmatched]
    cached_graphs = [g for g in graphs if g.chains]
    per_graph = [(k, s) for k, g in enumerate(cached_graphs)
                 for s in collect(CacheHandle(cache, calib, [g])) if s.steps > 0]
    if not per_graph:
        reason = "; ".join(dict.fromkeys(uncached)) or "no graph was compiled"
        raise _NothingCached(f"nothing cached for {args.model}: {reason}")
    names = {0: "cond", 1: "uncond"} if n_branches == 2 else {0: "-"}
    thr = cache.residual_diff_threshold
    from collections import Counter

    per_branch = Counter(s.branch for _, s in per_graph)  # graphs serving each branch
    clash = Counter((s.chain, s.branch) for _, s in per_graph)
    chains = []
    for k, s in per_graph:
        rows = []
        for i in range(s.steps):
            d = s.diffs[i]
            ts = timesteps[s.branch] if s.branch < n_branches else []
            rows.append({"step": i, "branch": names.get(s.branch, str(s.branch)),
                         "timestep": ts[i] if i < len(ts) and per_branch[s.branch] == 1 else None,
                         "diff": d if math.isfinite(d) and d >= 0 else None, "threshold": thr,
                         "gate": s.gates[i], "cached": bool(s.cached[i])})
        chain = s.chain if clash[(s.chain, s.branch)] == 1 else f"{s.chain} (graph {k})"
        chains.append({"chain": chain, "pattern": s.pattern, "n_blocks": s.n_blocks, "Fn": s.fn, "Bn": s.bn,
                       "branch": names.get(s.branch, str(s.branch)), "steps": s.steps,
                       "cached_steps": s.n_cached, "rows": rows})
    plot = plot_diffs([s for _, s in per_graph], thr, args.plot) if args.plot else None
    if args.format == "json":
        print(json.dumps({"model": args.model, "config": cache.strify(), "seconds": round(elapsed, 3),
                          "uncached_graphs": uncached, "chains": chains, "plot": plot}, indent=2))
        return 0
    print(f"trace {model.label}: {cache.strify()}{'_' + calib.strify() if calib else ''}, {args.steps} steps"
          f"{', separate CFG (cond + uncond calls)' if n_branches == 2 else ''}, inner eager, {elapsed:.2f}s")
    for reason in dict.fromkeys(uncached):
        print(f"note: a graph compiled uncached: {reason}")
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
    if plot:
        print(f"wrote {plot}")
    return 0


class _NothingCached(RuntimeError):
    pass


# ----------------------------------------------------------------------------- metrics


def metrics(args) -> int:
    from cachedit_fx import metrics as m

    result = m.compute(args.metric, args.ref, args.test, ssim_gaussian=args.ssim_gaussian,
                       lpips_net=args.lpips_net, clip_model=args.clip_model)
    m.print_notes(result)
    if args.json:
        print(json.dumps({"metric": result.metric, "mean": result.mean, "n": len(result.values),
                          "values": result.values}, indent=2))
    else:
        print(m.render(result, per_pair=True if args.per_pair else None))
    return 0


# ----------------------------------------------------------------------------- parser and errors


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr (exit 2)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def export_cmd(args) -> int:
    from cachedit_fx.aot import export
    from cachedit_fx.models import example_tensors, is_import_path, load_model, model_from_factory
    from cachedit_fx.shapes import parse_cli

    dynamic = parse_cli(args.dynamic or [])
    if args.model is None and not is_import_path(args.config):
        raise ValueError("export needs --model MODEL, or --config package.module:Factory with --args")
    if args.args and args.model is not None:
        raise ValueError("--args gives the example call of a --config factory's model; zoo and class models "
                         "come with theirs")
    with _quiet_libraries():
        if args.model is None:
            if not args.args:
                raise ValueError("--config package.module:Factory needs the example call: --args NAME=SHAPE ...")
            transformer, inputs = model_from_factory(args.config), example_tensors(args.args)
        else:
            model = load_model(args.model, args.config)
            transformer, inputs = model.transformer, dict(model.inputs)
        calib = {"taylorseer_order": args.taylorseer} if args.taylorseer else None
        path = export(transformer, example_kwargs=inputs, path=args.out, calibrator_config=calib,
                      cache_config={"Fn_compute_blocks": args.fn, "Bn_compute_blocks": args.bn,
                                    "residual_diff_threshold": args.threshold, "max_warmup_steps": args.warmup},
                      dynamic_shapes=dynamic)
    print(f"wrote {path}")
    return 0


MODEL_HELP = ("a zoo model name (flux, wan, ...: see cachedit_fx.testing.zoo.FAMILY_NAMES), package.module:Class "
              "with --config cfg.json (random weights), or a local diffusers model folder (config.json with "
              "_class_name; loaded with from_pretrained, no network)")
CONFIG_HELP = ("a diffusers-style config JSON for a package.module:Class MODEL; example inputs come from the zoo "
               "family with that transformer class")


def _model_args(p) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--config", help=CONFIG_HELP)
    _split_args(p)


def _split_args(p) -> None:
    p.add_argument("--fn", type=int, default=1, help="Fn_compute_blocks (default 1)")
    p.add_argument("--bn", type=int, default=0, help="Bn_compute_blocks (default 0)")


def _cache_args(p, warmup: int) -> None:
    p.add_argument("--threshold", type=float, default=0.08, help="residual_diff_threshold (default 0.08)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"max_warmup_steps (default {warmup})")
    p.add_argument("--taylorseer", type=int, default=0, metavar="ORDER", help="TaylorSeer order (default 0: off)")


def build_parser() -> argparse.ArgumentParser:
    from cachedit_fx.metrics import LPIPS_BACKBONES, METRICS, DEFAULT_CLIP_MODEL, video_support

    parser = _Parser(prog="cachedit-fx", description=__doc__,
                     epilog="Errors print one line on stderr; set CACHEDIT_FX_TRACEBACK=1 for the traceback of an "
                            "unexpected one.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,tune,diff,trace,metrics,export}")
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
    p.set_defaults(func=demo)

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
    p.set_defaults(func=tune_cmd)

    p = sub.add_parser(
        "diff", help="show what the passes do to a model's graph (text, json, dot, png, svg)",
        description="Show what the passes do to a model's graph: the chain found, its pattern, the Fn | middle | Bn "
                    "cut, the carried tensors, the inserted nodes (pre_step, cond, post_step) and the state. "
                    "dot emits Graphviz text (no Graphviz needed); png/svg are laid out by Graphviz's `dot` program "
                    "(exit 3 with how to install it when it is missing). Unmatched models print the reason and "
                    "exit 0.")
    _model_args(p)
    p.add_argument("--separate-cfg", action="store_true", help="state for two CFG branches")
    p.add_argument("--format", choices=DIFF_FORMATS, default=None,
                   help="default: from --out's extension, else text")
    p.add_argument("--out", help="write to this file (png/svg default: cachedit_diff_MODEL.FORMAT)")
    p.set_defaults(func=diff)

    p = sub.add_parser(
        "trace", help="run a tiny cached denoising loop and print the per-step decision table",
        description="Run a hand-written Euler loop (zoo.denoise) over MODEL's transformer under "
                    "cachedit_fx.enable_cache (compile=False) and print, per step: diff of the Fn residual, threshold, "
                    "the gate that settled the step and whether the middle was cached; write the diff plot. "
                    "Separate-CFG families call the transformer twice per step (cond, uncond).")
    _model_args(p)
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    _cache_args(p, warmup=2)
    p.add_argument("--no-cfg", action="store_true", help="separate-CFG families: call cond only")
    p.add_argument("--plot", default="trace.png", help="diff plot PNG (default trace.png; '' for none)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=trace)

    p = sub.add_parser(
        "metrics", help="PSNR / SSIM / MSE / LPIPS / CLIP score between images, folders or videos",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Compare REF and TEST: image files, video files (every frame) or folders of images / videos.\n"
            "Two folders pair files by name; otherwise frames pair by index (a folder of images is a sequence\n"
            "of frames in natural order). Frames are read as 8-bit RGB and converted to float64 before any\n"
            "arithmetic; PSNR/MSE use the 0..255 scale (PSNR prints inf for identical frames). The summary\n"
            "is the mean over pairs.\n"
            f"{video_support()}\n"
            "psnr, ssim, mse: scikit-image (ssim: 7x7 uniform window; --ssim-gaussian: 11x11 Gaussian, sigma 1.5).\n"
            "lpips: the `lpips` package or torchmetrics, with the torchvision backbone weights already in the\n"
            "torch hub cache (TORCH_HOME); nothing is downloaded.\n"
            f"clip_score: 100 * max(cos, 0) of CLIP embeddings, with a CLIP model available locally\n"
            f"(--clip-model, default {DEFAULT_CLIP_MODEL} from the Hugging Face cache); REF may be a .txt file of\n"
            "prompts (one, or one per test frame) for the text-image score; otherwise image-image.\n"
            "Exit codes: 0 ok, 2 bad input, 3 metric unavailable here (the line says how to provide it)."))
    p.add_argument("metric", choices=METRICS)
    p.add_argument("ref", help="reference: image, video, folder (or a prompts .txt for clip_score)")
    p.add_argument("test", help="test: image, video or folder")
    p.add_argument("--json", action="store_true", help="print a JSON object (mean, per-pair values)")
    p.add_argument("--per-pair", action="store_true", help="print every pair's value, even for a single pair")
    p.add_argument("--ssim-gaussian", action="store_true", help="SSIM with Wang et al.'s Gaussian window")
    p.add_argument("--lpips-net", choices=sorted(LPIPS_BACKBONES), default="alex")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="local folder or Hugging Face cache id")
    p.set_defaults(func=metrics)

    p = sub.add_parser(
        "export", help="export a cached transformer as an AOTInductor package (.pt2)",
        description="torch.export the transformer with the cache decision inside the program and package it with "
                    "AOTInductor. The package serves the example call's shapes, or any size along the --dynamic "
                    "dims; load it with cachedit_fx.load(path) and use it as pipe.transformer.")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--config", help=CONFIG_HELP + "; or, without --model, package.module:Factory: a callable "
                                                  "returning the module to export (with --args)")
    p.add_argument("--args", action="append", metavar="NAME=SHAPE[:DTYPE]",
                   help="an example tensor argument of a --config factory's model, by forward parameter name "
                        "(repeatable; floats uniform in [0, 1), integers zero), e.g. --args x=1x64x16 --args t=1")
    p.add_argument("--out", default="model.pt2")
    p.add_argument("--dynamic", action="append", metavar="ARG:DIM[:NAME]",
                   help="let dimension DIM of forward argument ARG vary (repeatable; items with the same NAME share "
                        "one size, e.g. --dynamic hidden_states:1:tokens --dynamic img_ids:0:tokens)")
    _split_args(p)
    _cache_args(p, warmup=8)
    p.set_defaults(func=export_cmd)
    return parser


def _root_error(e: BaseException) -> BaseException:
    """The user-facing cause of an error wrapped by Dynamo (BackendCompilerFailed) or re-raised."""
    seen = set()
    cur = e
    while id(cur) not in seen:
        seen.add(id(cur))
        inner = getattr(cur, "inner_exception", None) or cur.__cause__
        if inner is None:
            break
        cur = inner
    return cur


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and text.startswith("'"):
        text = text.strip("'")
    first = text.splitlines()[0] if text else type(e).__name__
    return first


def main(argv=None) -> int:
    from cachedit_fx.errors import MissingDependency
    from cachedit_fx.metrics import MetricError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    prog = f"cachedit-fx {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure is one line on stderr, no traceback
        if os.environ.get("CACHEDIT_FX_TRACEBACK"):
            raise
        root = _root_error(e)
        if isinstance(root, MissingDependency):
            print(f"{prog}: {_one_line(root)}", file=sys.stderr)
            return 3
        if isinstance(root, _NothingCached):
            print(f"{prog}: {_one_line(root)}", file=sys.stderr)
            return 1
        if isinstance(root, (MetricError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
                             IsADirectoryError, PermissionError)):
            print(f"{prog}: {_one_line(root)}", file=sys.stderr)
            return 2
        print(f"{prog}: error: {type(root).__name__}: {_one_line(root)} "
              f"(set CACHEDIT_FX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
