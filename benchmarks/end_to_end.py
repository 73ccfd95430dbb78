"""End-to-end sampling: a 28-step Euler loop (zoo.denoise) over the medium random Flux, F1B0, warmup 4.

    python benchmarks/end_to_end.py [--quick]

The cachedit threshold is tuned (on the compile=False instance, by bisection) so that ~40-50% of the steps
are cached, then the same threshold is loaded into the Inductor instance with handle.configure (no
recompile). diffusers' FirstBlockCache runs eager at the same threshold, at a threshold tuned to cache
the same number of steps, and under torch.compile (its decision is a Python .item(), so the graph splits,
see compile_health.py) at the same threshold (its diff is against the last *computed* step, so equal numbers do not mean equal steps).
Quality: PSNR / SSIM (skimage) of the final latent against the uncached eager run.
"""
from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import torch

from _common import FBC, build_model, cachedit, cfg, compile_own, parse_args, table, tune_threshold, write_json
from cachedit_fx import zoo
from cachedit_fx.runtime.stats import collect
from cachedit_fx.tools.metrics import psnr


def quality(ref: torch.Tensor, x: torch.Tensor, side: int) -> dict:
    from skimage.metrics import structural_similarity

    a = ref.reshape(side, side, -1).double().numpy()
    b = x.reshape(side, side, -1).double().numpy()
    rng = float(a.max() - a.min())
    if np.array_equal(a, b):
        return {"psnr_db": float("inf"), "ssim": 1.0}
    return {"psnr_db": psnr(a, b, data_range=rng),
            "ssim": float(structural_similarity(a, b, data_range=rng, channel_axis=-1))}


def main():
    args = parse_args("end_to_end")
    quick = args.quick
    inner = "eager" if quick else "inductor"
    steps, rounds = (8, 1) if quick else (28, 2)
    model, inputs, info = build_model(quick)
    side = int(round(inputs["hidden_states"].shape[1] ** 0.5))
    timings: dict[str, list[float]] = {}

    def run(name, call, reset=None, record=True):
        if reset:
            reset()
        t0 = time.perf_counter()
        x, _ = zoo.denoise(model, "flux", inputs, num_steps=steps, call=call)
        dt = time.perf_counter() - t0
        if record:
            timings.setdefault(name, []).append(dt)
        return x

    with torch.no_grad():
        ref = run("eager (uncached)", model, record=False)
        # 1) tune the threshold on the compile=False instance
        eager_c, h_eager = cachedit(model, "eager")
        thr, tuning = tune_threshold(lambda: run("tune", eager_c, record=False), h_eager, steps, 1 if quick else 4)
        # 2) FirstBlockCache at the same threshold, and at one caching the same number of steps
        n_target = tuning[-1]["cached"]
        fbc_same = FBC(model, thr)
        run("fbc_tune", fbc_same, fbc_same.reset, record=False)
        fbc_same_n = fbc_same.cached_steps()
        fbc_thr, lo, hi = thr, 0.0, thr * 2
        fbc_match, best = fbc_same, abs(fbc_same_n - n_target)
        fbc_tuning = [{"threshold": thr, "cached": fbc_same_n}]
        if fbc_same_n != n_target and not quick:
            for _ in range(6):
                t_try = (lo + hi) / 2
                cand = FBC(model, t_try)
                run("fbc_tune", cand, cand.reset, record=False)
                n = cand.cached_steps()
                fbc_tuning.append({"threshold": t_try, "cached": n})
                if abs(n - n_target) < best:
                    fbc_match, fbc_thr, best = cand, t_try, abs(n - n_target)
                if n == n_target:
                    break
                lo, hi = (t_try, hi) if n < n_target else (lo, t_try)
        fbc_label = "same #cached" if best == 0 else "closest #cached"
        # FirstBlockCache under torch.compile (graph breaks at its .item(); compiled on a warm run)
        fbc_comp, fbc_compile = None, 0.0
        if not quick:  # (quick: inner is eager; skip the 9-graph trace to keep the smoke test short)
            fbc_comp = FBC(model, thr, compile_backend=inner)
            t0 = time.perf_counter()
            run("warm", fbc_comp, fbc_comp.reset, record=False)
            fbc_compile = time.perf_counter() - t0
        # 3) the compiled instances (compile on first call, outside timing)
        plain = compile_own(copy.deepcopy(model), inner)
        comp_c, h_comp = (eager_c, h_eager) if quick else cachedit(model, inner)
        h_comp.configure(cfg(thr))
        t0 = time.perf_counter()
        run("warm", plain, record=False)
        plain_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        run("warm", comp_c, h_comp.reset, record=False)
        cachedit_compile = time.perf_counter() - t0
        variants = {
            f"plain {inner} (uncached)": (plain, None, None),
            "eager (uncached)": (model, None, None),
            f"cachedit-fx ({inner})": (comp_c, h_comp.reset, lambda: sum(s.n_cached for s in collect(h_comp))),
        }
        if not quick:  # (quick: the row above already is the compile=False instance)
            variants["cachedit-fx (compile=False, inner eager)"] = (eager_c, h_eager.reset,
                                                         lambda: sum(s.n_cached for s in collect(h_eager)))
        variants[f"diffusers FirstBlockCache eager (threshold {thr:.4g}, same)"] = (fbc_same, fbc_same.reset,
                                                                                  fbc_same.cached_steps)
        if fbc_match is not fbc_same:
            variants[f"diffusers FirstBlockCache eager (threshold {fbc_thr:.4g}, {fbc_label})"] = (
                fbc_match, fbc_match.reset, fbc_match.cached_steps)
        if fbc_comp is not None:
            variants[f"diffusers FirstBlockCache + torch.compile {inner} (threshold {thr:.4g})"] = (
                fbc_comp, fbc_comp.reset, fbc_comp.cached_steps)
        outs, cached = {}, {}
        for _ in range(rounds):  # interleaved rounds
            for name, (call, reset, count) in variants.items():
                outs[name] = run(name, call, reset)
                cached[name] = count() if count else 0
    for name, (_, reset, count) in variants.items():
        if name.startswith("cachedit-fx"):
            assert cached[name] > 0, f"{name}: no step cached (compiled graph not the cachedit one?)"
    base = statistics.median(timings[f"plain {inner} (uncached)"])
    base_eager = statistics.median(timings["eager (uncached)"])
    rows = []
    for name in variants:
        t = statistics.median(timings[name])
        q = quality(ref, outs[name], side)
        rows.append({"method": name, "total s": t, f"speedup vs plain {inner}": base / t,
                     "speedup vs eager": base_eager / t, "cached steps": f"{cached[name]}/{steps}",
                     "PSNR dB": q["psnr_db"], "SSIM": q["ssim"]})
    rows.append({"method": "cache-dit library", "total s": "not installed"})
    try:
        import cache_dit  # noqa: F401
        rows[-1]["total s"] = "installed but not benchmarked"
    except ImportError:
        pass
    print(f"## end_to_end ({info['model']}; {steps} Euler steps, F1B0, W4, cachedit threshold {thr:.4g}; "
          f"median of {rounds} interleaved runs)\n")
    print(table(["method", "total s", f"speedup vs plain {inner}", "speedup vs eager", "cached steps", "PSNR dB",
                 "SSIM"], rows))
    print(f"\nfirst (compiling) run: plain {inner} {plain_compile:.1f} s, cachedit-fx {cachedit_compile:.1f} s, "
          f"FirstBlockCache + torch.compile {fbc_compile:.1f} s")
    write_json("end_to_end", args, {"info": info, "steps": steps, "rounds": rounds, "threshold": thr,
                                    "tuning": tuning, "fbc_tuning": fbc_tuning, "rows": rows,
                                    "timings_s": timings, "first_run_s": {"plain": plain_compile,
                                                                          "cachedit": cachedit_compile,
                                                                          "fbc_compiled": fbc_compile}})


if __name__ == "__main__":
    main()
