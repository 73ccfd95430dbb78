"""Cold start: what the first request costs, compile included, and what a restart on the same cache costs.

Each variant runs in a fresh subprocess with an empty Inductor cache of its own (``TORCHINDUCTOR_CACHE_DIR``,
one compile thread); a ``-warm`` variant is a second process on the cache directory its cold variant left,
as a server restart would be. Models: FLUX.1's depth (19 double + 38 single blocks) and Wan 2.1's (30
blocks) at a tiny width, so that compiling dominates. Per variant: the first call (compile + run), the
steady computed and cached step (median of interleaved rounds), and the first call at a second and a third
resolution (an automatic-dynamic recompile, then nothing). Variants:

- ``plain``: ``torch.compile(transformer, fullgraph=True)``;
- ``regional``: diffusers' ``compile_repeated_blocks(fullgraph=True)`` (each block class compiled once);
- ``cache-dit``: cache-dit 1.5.3's ``enable_cache`` then ``torch.compile`` (skipped where not installed);
- ``enable``: cachedit-fx ``enable_cache(transformer)`` (blocks as compiled regions inside the one graph);
- ``enable-flat``: the same with every block inline, the graph cachedit-fx compiled before regions;
- ``backend``: ``cachedit_fx.mark_regions(t)`` then ``torch.compile(t, backend="cachedit")``;
- ``enable-background``: ``enable_cache(transformer, background_compile=True)``: Inductor compiles in a child
  process while calls run the graph eagerly; also reports when the compiled graph took over (seconds from
  the first call's start, eager calls before, the switching call's seconds);
- ``enable-warm``, ``backend-warm``, ``regional-warm``, ``enable-background-warm``: a second process on the
  cold variant's cache dir;
- ``interleaved``: ``enable`` and ``enable-background`` in one process, their steady computed and cached
  steps measured in 3 x repeats interleaved rounds (each a median over the round's calls; the median of
  the rounds).

``--quick``: FLUX at depth 2 + 2, the aot_eager compiler (no Inductor), few repeats, variants run two at a
time: a smoke test of the script (tests/test_benchmarks.py), not a measurement.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from _common import HERE, parse_args, table, write_json

VARIANTS = ("plain", "regional", "cache-dit", "enable", "enable-flat", "backend", "enable-background", "interleaved")
WARM = {"enable-warm": "enable", "backend-warm": "backend", "regional-warm": "regional",
        "enable-background-warm": "enable-background"}
QUICK_VARIANTS = ("plain", "regional", "enable", "backend", "enable-warm")
DEPTH = {"flux": (19, 38), "wan": (30,)}
QUICK_DEPTH = {"flux": (2, 2), "wan": (2,)}
CACHING = ("cache-dit", "enable", "enable-flat", "backend", "enable-warm", "backend-warm", "enable-background",
           "enable-background-warm")


def _extra(p):
    p.add_argument("--models", default="flux,wan", help="comma-separated: flux, wan")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants (default all)")
    p.add_argument("--repeats", type=int, default=None, help="steady-state rounds (default 5, quick 2)")


def _run_child(model: str, variant: str, cache_dir: str, quick: bool, repeats: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(HERE / "_cold_child.py"), model, variant, str(repeats)] + (["--quick"] if quick else [])
    started = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"model": model, "variant": variant, "error": (p.stderr or p.stdout)[-1500:]}
    return {**json.loads(lines[-1]), "process_s": round(time.perf_counter() - started, 1)}


def _plan(variants):
    """Rounds of (variant, the cold variant whose cache dir it reuses or None); a warm variant runs in a
    round after its cold one."""
    cold = [v for v in variants if v not in WARM]
    warm = [v for v in variants if v in WARM and WARM[v] in cold]
    return [[(v, None) for v in cold], [(v, WARM[v]) for v in warm]]


def run_model(model: str, variants, quick: bool, repeats: int, root: str) -> list[dict]:
    dirs = {v: os.path.join(root, f"{model}-{v}") for v in variants if v not in WARM}
    rows = []
    for round_ in _plan(variants):
        jobs = [(v, dirs[reuse] if reuse else dirs[v]) for v, reuse in round_]
        with ThreadPoolExecutor(max_workers=2 if quick else 1) as pool:  # the full run: one process at a time
            rows += list(pool.map(lambda job: _run_child(model, job[0], job[1], quick, repeats), jobs))
    return rows


def _ratios(rows: list[dict]) -> dict:
    by = {r["variant"]: r for r in rows if "error" not in r}
    out = {}
    if "enable" in by and "regional" in by:
        out["enable first call / regional first call (target <= 1.2)"] = by["enable"]["first_call_s"] / \
            by["regional"]["first_call_s"]
    if "enable-background" in by and "regional" in by:
        out["enable-background first call / regional first call (target <= 1.2)"] = \
            by["enable-background"]["first_call_s"] / by["regional"]["first_call_s"]
        out["enable-background compiled graph serving after / enable first call"] = \
            by["enable-background"]["compiled_after_s"] / by["enable"]["first_call_s"] if "enable" in by else None
    if "interleaved" in by:
        pair = by["interleaved"]
        for key in ("computed_ms", "cached_ms"):
            out[f"interleaved: background / sync {key[:-3]} step (target <= 1.02 / <= 1.0)"] = \
                pair[f"background_{key}"] / pair[f"sync_{key}"]
    if "enable" in by and "enable-flat" in by:
        out["enable computed step / flat computed step (target <= 1.02)"] = by["enable"]["computed_ms"] / \
            by["enable-flat"]["computed_ms"]
        out["enable cached step / flat cached step (target <= 1.0)"] = by["enable"]["cached_ms"] / \
            by["enable-flat"]["cached_ms"]
    for warm, cold in WARM.items():
        if warm in by and cold in by:
            out[f"{warm} first call / {cold} first call (target <= 0.2)"] = by[warm]["first_call_s"] / \
                by[cold]["first_call_s"]
    return {k: round(v, 3) for k, v in out.items() if v is not None}


def _table(rows: list[dict]) -> str:
    plain = next((r["first_call_s"] for r in rows if r.get("variant") == "plain" and "first_call_s" in r), None)
    shown = []
    for r in rows:
        if r.get("variant") == "interleaved" and "error" not in r:
            continue  # its steady steps are printed as ratios below the table
        if "error" in r:
            shown.append({"variant": r["variant"], "first call s": "error: " + r["error"].splitlines()[-1][:80]})
            continue
        shown.append({"variant": r["variant"], "first call s": r["first_call_s"],
                      "vs plain": round(r["first_call_s"] / plain, 2) if plain else "",
                      "compiled after s": r.get("compiled_after_s", ""),
                      "computed ms": r["computed_ms"], "cached ms": r.get("cached_ms", ""),
                      "2nd size s": r["second_size_s"], "3rd size s": r["third_size_s"],
                      "graphs": r["graphs"], "region calls": r.get("region_calls", ""),
                      "FX cache hit/miss": f"{r['fx_cache_hit']}/{r['fx_cache_miss']}",
                      "AOT cache hit/miss": f"{r['aot_cache_hit']}/{r['aot_cache_miss']}"})
    return table(list(shown[0]) if shown else [], shown)


def main():
    args = parse_args("cold_start", _extra)
    models = [m for m in args.models.split(",") if m]
    variants = tuple(args.variants.split(",")) if args.variants else (QUICK_VARIANTS if args.quick else
                                                                        VARIANTS + tuple(WARM))
    if args.quick and not args.variants:
        models = ["flux"]
    repeats = args.repeats or (2 if args.quick else 5)
    results = {}
    print("## cold_start\n")
    with tempfile.TemporaryDirectory(prefix="cold_start_") as root:
        for model in models:
            rows = run_model(model, variants, args.quick, repeats, root)
            results[model] = {"rows": rows, "ratios": _ratios(rows)}
            depth = (QUICK_DEPTH if args.quick else DEPTH)[model]
            print(f"### {model} ({' + '.join(map(str, depth))} blocks)\n")
            print(_table(rows))
            for k, v in results[model]["ratios"].items():
                print(f"- {k}: {v}")
            print()
    failed = [r for m in results.values() for r in m["rows"] if "error" in r]
    write_json("cold_start", args, {"models": results, "depth": QUICK_DEPTH if args.quick else DEPTH})
    if failed:
        sys.exit(f"{len(failed)} variant(s) failed: " + ", ".join(f"{r['model']}/{r['variant']}" for r in failed))


if __name__ == "__main__":
    main()
