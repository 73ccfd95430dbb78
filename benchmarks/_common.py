"""Shared helpers for the benchmark scripts: the random Flux models, the cache methods (cachedit-fx, diffusers'
FirstBlockCache) and the threshold search, timing, tables, JSON."""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
# at import, i.e. when the script starts (write_json, at the end, adds the load then)
LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None
TARGET = (0.40, 0.50)  # fraction of a request's steps the threshold search aims to cache


def flux_config(num_layers: int, num_single_layers: int, heads: int, head_dim: int = 64, cond_dim: int = 64) -> dict:
    """FluxTransformer2DModel kwargs for a random Flux of the given depth and width (dim = heads x head_dim;
    patch size 1, 16 latent channels, text / pooled width ``cond_dim``; the rope axes split head_dim 1:1.5:1.5)."""
    axes = [head_dim // 4, 3 * head_dim // 8, head_dim - head_dim // 4 - 3 * head_dim // 8]
    return dict(patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=cond_dim,
                pooled_projection_dim=cond_dim, axes_dims_rope=axes)


# Medium random Flux: 2 double + 6 single blocks, dim 128 (2 heads x 64), 576 image + 32 text tokens
# (1024 tokens / dim 256 took 0.6-1.1 s a step on the shared 2-core CPU; this is ~0.2-0.4 s).
MEDIUM = flux_config(2, 6, heads=2)
MEDIUM_SIDE, MEDIUM_TXT = 24, 32
# peers.py's latency-bound Flux (config, image side, text tokens): small, few tokens, host-bound
LATENCY_BOUND = (flux_config(2, 4, heads=1), 8, 16)


def parse_args(name: str, extra=None):
    p = argparse.ArgumentParser(description=f"cachedit-fx benchmark: {name}")
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats, inner aot_eager (smoke test)")
    p.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core box, 2 threads wait on each "
                        "other whenever another job holds a core, and medians swing by 10x)")
    if extra:
        extra(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def flux_dev_config(num_layers: int = 19, num_single_layers: int = 38) -> dict:
    """FLUX.1-dev's transformer config (dim 3072: 24 heads x 128, 64 latent channels, T5 width 4096, pooled
    CLIP width 768, guidance embedding, rope axes 16 / 56 / 56), at the given depth."""
    return dict(patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def build_flux(config: dict, side: int, txt: int, seed: int = 0, device="cpu", dtype=torch.float32):
    """(transformer, inputs, info) for a random FluxTransformer2DModel(**config) on a side x side latent
    (patch size 1: side**2 image tokens) and ``txt`` text tokens, its weights created in ``dtype`` on
    ``device`` (a 12B model never exists in fp32); a guidance input where the config embeds one."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            t = FluxTransformer2DModel(**config).eval()
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                         indexing="ij"), -1).reshape(-1, 3)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, config["in_channels"], generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, txt, config["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype),
        timestep=torch.tensor([1.0], device=device), img_ids=img_ids.float().to(device),
        txt_ids=torch.zeros(txt, 3, device=device), return_dict=False)
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5], device=device)
    desc = (f"random FluxTransformer2DModel {config['num_layers']} double + {config['num_single_layers']} single "
            f"blocks, dim {config['attention_head_dim'] * config['num_attention_heads']}, "
            f"{side * side} image + {txt} text tokens, {str(dtype).replace('torch.', '')}")
    return t, inputs, {"model": desc}


def build_model(quick: bool, seed: int = 0):
    """(transformer, inputs, info). Quick: the zoo's tiny Flux; full: the medium model above."""
    if quick:
        from cachedit_fx import zoo

        t, inputs = zoo.build_transformer("flux", seed)
        return t.eval(), inputs, {"model": "zoo tiny flux (4+4 blocks, dim 32, 64 tokens)"}
    return build_flux(MEDIUM, MEDIUM_SIDE, MEDIUM_TXT, seed)


def shared_copy(model):
    """A copy of ``model``'s modules that shares its parameters and buffers (the variants of a model too
    large to hold twice: each gets its own hooks, patches and compiled forward over one set of weights)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def first_block_only(model, clone=copy.deepcopy):
    """A copy that keeps only the first double block (the ideal F1B0 cached step: Fn only)."""
    m = clone(model)
    m.transformer_blocks = torch.nn.ModuleList(list(m.transformer_blocks)[:1])
    m.single_transformer_blocks = torch.nn.ModuleList()
    return m


def first_block_cache(model, threshold: float) -> list[bool]:
    """Apply diffusers' FirstBlockCache to ``model`` in place; returns the list its head-block hook
    appends each call's decision to (True: the remaining blocks ran, False: cached)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks import first_block_cache as fbc

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
    if not getattr(fbc.FBCHeadBlockHook, "_bench_wrapped", False):
        orig = fbc.FBCHeadBlockHook._should_compute_remaining_blocks

        def counted(hook, r):
            out = orig(hook, r)
            getattr(hook, "_bench_log", []).append(out)
            return out

        fbc.FBCHeadBlockHook._should_compute_remaining_blocks = counted
        fbc.FBCHeadBlockHook._bench_wrapped = True
    decisions: list[bool] = []
    for h in head_block_hooks(model):
        h._bench_log = decisions
    return decisions


def head_block_hooks(model) -> list:
    """FirstBlockCache's head-block hooks in ``model`` (one per application)."""
    from diffusers.hooks import first_block_cache as fbc

    registries = [getattr(mod, "_diffusers_hook", None) for mod in model.modules()]
    return [h for reg in registries if reg is not None for h in reg.hooks.values()
            if isinstance(h, fbc.FBCHeadBlockHook)]


def compile_own(model, backend, **kwargs):
    """``torch.compile(model, backend=...)`` on a private copy of its forward's code object. Dynamo keeps its
    compiled entries per code object, and deep copies of one model share their class's forward: each
    call would walk every variant's entries and guards before finding its own, an overhead that grows
    with the number of variants compiled in the process (enable_cache compiles a private copy too)."""
    from cachedit_fx.capture.dynamo import private_code

    model.forward = private_code(model.forward)
    return torch.compile(model, backend=backend, dynamic=False, **kwargs)


def cfg(threshold: float, warmup: int = 4, **limits):
    """The benchmarks' cachedit-fx config: F1B0, ``warmup`` warmup steps, no separate CFG; ``limits``: more
    DBCacheConfig fields (max_cached_steps, max_continuous_cached_steps)."""
    from cachedit_fx.config import DBCacheConfig

    return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                         max_warmup_steps=warmup, enable_separate_cfg=False, **limits)


def cachedit(model, inner: str, clone=copy.deepcopy):
    """(cached copy of ``model``, its handle): cachedit-fx's enable_cache at threshold 0 (configure it later)."""
    from cachedit_fx.install.api import enable_cache
    from cachedit_fx.install.hook import cache_hook

    # enable_cache compiles a private copy of forward's code object: a plain torch.compile(backend="cachedit")
    # of a deepcopy shares FluxTransformer2DModel.forward's Dynamo cache (and its recompile limit of 8) with
    # the plain-Inductor and FirstBlockCache instances here, and once that limit was hit (FirstBlockCache's
    # graph breaks add entries) the cachedit instances silently ran the other backends' graphs, uncached.
    m = enable_cache(clone(model), cache_config=cfg(0.0), inner=inner)
    return m, cache_hook(m).handle


def cachedit_model(model, threshold: float, inner: str, clone=copy.deepcopy, inner_options=None):
    """(compiled copy, handle) through the cachedit backend with no warmup: threshold 0 computes every step,
    1e9 caches every step after the first (the per-step cost benchmarks); ``inner_options`` go to the inner
    compiler (Inductor's config patches)."""
    from cachedit_fx.runtime.handle import CacheHandle

    c = cfg(threshold, warmup=0)
    handle = CacheHandle(c, None)
    compiled = compile_own(clone(model), "cachedit", options={"cache_config": c, "inner": inner, "handle": handle,
                                                               "separate_cfg": False,
                                                               "inner_options": inner_options or {}})
    return compiled, handle


def check_all_but_first_cached(handle, label: str) -> tuple[int, int]:
    """(cached, steps) of a ``cachedit_model(..., 1e9, ...)`` instance, asserting it did what its threshold
    says: after the first (computing) call every call was cached."""
    from cachedit_fx.runtime.stats import collect

    chains = collect(handle)
    n_c, n_s = sum(s.n_cached for s in chains), sum(s.steps for s in chains)
    assert n_s and n_c == n_s - 1, f"{label}: {n_c} of {n_s} steps cached (expected all but the first)"
    return n_c, n_s


class FBC:
    """diffusers FirstBlockCache on a copy of the model, recording its decisions. Its threshold is read on
    the host by a ``torch.compiler.disable``d function, so a new one needs no recompile (``configure``)."""

    def __init__(self, model, threshold, compile_backend=None, clone=copy.deepcopy):
        self.m = clone(model)
        self.decisions = first_block_cache(self.m, threshold)
        self.call_m = self.m if compile_backend is None else compile_own(self.m, compile_backend)

    def __call__(self, **kw):
        with self.m.cache_context("cond"):
            return self.call_m(**kw)

    def reset(self):
        self.m._reset_stateful_cache()
        self.decisions.clear()

    def configure(self, threshold: float) -> None:
        """The next requests' threshold; starts afresh. FirstBlockCache computes when ``diff > threshold``:
        a threshold <= 0 becomes -inf, so that it never caches, as cachedit-fx's and cache-dit's gate
        ``threshold <= 0`` does (0 would still cache a diff of exactly 0: the same input every call)."""
        for h in head_block_hooks(self.m):
            h.threshold = threshold if threshold > 0 else float("-inf")
        self.reset()

    def cached_list(self):
        return [i for i, d in enumerate(self.decisions) if not d]

    def cached_steps(self):
        return sum(1 for d in self.decisions if not d)


def tune_threshold(request, handle, steps: int, rounds: int, target=TARGET, warmup: int = 4, **limits):
    """Bisect the threshold of ``handle`` (a compile=False cachedit instance: same decisions, fast) until a
    request, run by ``request()``, caches a fraction ``target`` of its ``steps``; the search starts at the
    0.55 quantile of the diffs of an all-computing request. The threshold found is then moved to the middle
    of the gap between the diffs its last request compared (``centre_threshold``: the same decisions, the
    widest margin against another implementation's rounding). Returns (threshold, [{threshold, cached}])."""
    import numpy as np
    from cachedit_fx.runtime.stats import collect

    handle.configure(cfg(1e-12, warmup, **limits))  # (threshold 0 skips the diff test) every step computes
    handle.reset()
    request()
    diffs = [d for d in collect(handle)[0].diffs[warmup:] if np.isfinite(d)]
    lo, hi = 0.0, max(diffs) * 1.01
    thr = float(np.quantile(diffs, 0.55))
    tuning = []
    for _ in range(rounds):
        handle.configure(cfg(thr, warmup, **limits))
        handle.reset()
        request()
        n = sum(s.n_cached for s in collect(handle))
        tuning.append({"threshold": thr, "cached": n})
        frac = n / steps
        if target[0] <= frac <= target[1]:
            break
        lo, hi = (thr, hi) if frac < target[0] else (lo, thr)
        thr = (lo + hi) / 2
    centred, margin = centre_threshold(handle, tuning[-1]["threshold"])
    tuning.append({"threshold": centred, "cached": tuning[-1]["cached"], "centred": True, "margin": margin})
    handle.configure(cfg(centred, warmup, **limits))
    return centred, tuning


def centre_threshold(handle, threshold: float) -> tuple[float, float]:
    """(threshold, margin): the middle of the gap around ``threshold`` between the diffs the diff test
    compared in ``handle``'s last request (no compared diff lies between the old and the new threshold, so
    that request's decisions, and therefore its diffs, stay the same), and the relative distance from it
    to the nearest compared diff."""
    import numpy as np
    from cachedit_fx.runtime.stats import collect

    compared = [d for s in collect(handle) for d, g in zip(s.diffs, s.gates) if g == "diff_test" and np.isfinite(d)]
    below = [d for d in compared if d < threshold]
    above = [d for d in compared if d >= threshold]
    if below and above:
        threshold = (max(below) + min(above)) / 2
    margin = min(abs(d - threshold) for d in compared) / threshold if compared and threshold > 0 else float("inf")
    return float(threshold), float(margin)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in LOAD_AT_START] if LOAD_AT_START else None,
            "loadavg_at_end": [round(x, 2) for x in load] if load else None}


def time_interleaved(fns: dict, repeats: int, inner: int = 1, sync=None) -> dict:
    """Median seconds per call of each fn, calls interleaved (A B C A B C ...) so load drift hits all;
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops."""
    sync = sync or (lambda: None)
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[k].append((time.perf_counter() - t0) / inner)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "n": len(v)} for k, v in samples.items()}


def guard_check_us(fn, calls: int = 20) -> float:
    """Mean microseconds per call that Dynamo spends finding the compiled graph for ``fn()`` (its
    guards: every parameter's and submodule's checks), from the profiler's "TorchDynamo Cache Lookup"
    range; 0.0 where the call runs no compiled frame."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    total = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup")
    return total / calls


def table(headers, rows) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(h, "")) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def write_json(name: str, args, payload: dict) -> Path:
    out = Path(args.out) if args.out else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{name}.quick.json" if args.quick and not args.out else f"{name}.json")
    payload = {"benchmark": name, "quick": bool(args.quick), "machine": machine(),
               "command": f"python benchmarks/{name}.py" + (" --quick" if args.quick else ""), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}")
    return path
