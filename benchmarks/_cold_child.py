"""One variant of benchmarks/cold_start.py in this (fresh) process: prints one JSON line.

usage: python benchmarks/_cold_child.py MODEL VARIANT REPEATS [--quick] [--profile]   (cold_start.py sets the cache dir)

``--profile``: the first call under cProfile, then Dynamo's compile phases (``compile_times``) and the top
functions by cumulative time on stderr (Python phases read ~1.6x slower than without the profiler).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLUX_TXT, WAN_TXT = 12, 12
# cachedit-fx's config in every variant: Fn 1, Bn 0, computing every step (Cachedit.set switches to caching)
CONFIG = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.0, max_warmup_steps=0,
              enable_separate_cfg=False)
SIZES = {"flux": (16, 12, 20), "wan": (8, 6, 10)}  # latent side of the first, second and third resolution
QUICK_SIZES = {"flux": (8, 6, 10), "wan": (4, 6, 8)}


def build(model: str, depth):
    torch.manual_seed(0)
    if model == "flux":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=depth[0], num_single_layers=depth[1],
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]).eval()
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=depth[0],
                                 rope_max_seq_len=64).eval()


def inputs(model: str, side: int, t: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if model == "flux":
        grid = torch.arange(side).float()
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), grid, grid, indexing="ij"), -1).reshape(-1, 3)
        return dict(hidden_states=torch.randn(1, side * side, 16, generator=g),
                    encoder_hidden_states=torch.randn(1, FLUX_TXT, 32, generator=g),
                    pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([t]),
                    img_ids=img_ids, txt_ids=torch.zeros(FLUX_TXT, 3), return_dict=False)
    return dict(hidden_states=torch.randn(1, 16, 2, side, side, generator=g), timestep=torch.tensor([1000.0 * t]),
                encoder_hidden_states=torch.randn(1, WAN_TXT, 32, generator=g), return_dict=False)


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (Inductor's C++ compiler runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Cachedit:
    """Switches a cachedit-fx instance between computing every step and caching every step after the first
    (numbers only: no recompile)."""

    def __init__(self, transformer):
        self.t = transformer

    def set(self, cached: bool) -> None:
        import cachedit_fx

        cachedit_fx.refresh_context(self.t, residual_diff_threshold=1e9 if cached else 0.0, max_warmup_steps=0)


class CacheDit:
    def __init__(self, lib, transformer):
        self.lib, self.t = lib, transformer

    def set(self, cached: bool) -> None:
        self.lib.refresh_context(self.t, cache_config=self.lib.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=1e9 if cached else 0.0,
            max_warmup_steps=0, enable_separate_cfg=False))


def prepare(t, variant: str, quick: bool):
    """(the callable, a Cachedit / CacheDit switch or None)."""
    inner = "aot_eager" if quick else "inductor"
    if variant == "plain":
        return torch.compile(t, fullgraph=True, backend=inner), None
    if variant in ("regional", "regional-warm"):
        t.compile_repeated_blocks(fullgraph=True, backend=inner)
        return t, None
    if variant == "cache-dit":
        import cache_dit

        cache_dit.set_compile_configs(descent_tuning=False)
        cache_dit.enable_cache(t, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.0, max_warmup_steps=0,
            enable_separate_cfg=False))
        return torch.compile(t, backend=inner), CacheDit(cache_dit, t)
    import cachedit_fx

    if variant.startswith("backend"):
        cachedit_fx.mark_regions(t)
        return torch.compile(t, backend="cachedit", fullgraph=True,
                             options={"cache_config": CONFIG, "inner": inner}), Cachedit(t)
    cachedit_fx.enable_cache(t, inner=inner, background_compile=variant.startswith("enable-background"), **CONFIG)
    if variant == "enable-flat":
        from cachedit_fx.install.hook import cache_hook

        cache_hook(t).graph.regions_off = "benchmark: the flat graph (every block inline)"
    return t, Cachedit(t)


def steady(call, model: str, side: int, switch, repeats: int, calls: int) -> dict:
    """Median ms per call, computing and (with a switch) caching, in interleaved rounds of ``calls`` calls
    at falling timesteps (one request each; a round's first call computes)."""
    samples = {"computed_ms": [], "cached_ms": []} if switch else {"computed_ms": []}
    with torch.no_grad():
        for _ in range(repeats):
            for key in samples:
                if switch:
                    switch.set(key == "cached_ms")
                for i in range(calls):
                    x = inputs(model, side, 1.0 - i / (calls + 1))
                    started = time.perf_counter()
                    call(**x)
                    if i:
                        samples[key].append(1e3 * (time.perf_counter() - started))
    return {k: round(statistics.median(v), 3) for k, v in samples.items()}


def first_call(call, x, profile: bool = False) -> tuple[float, float]:
    import cProfile

    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        if profiler:
            profiler.enable()
        call(**x)
        if profiler:
            profiler.disable()
    took = round(time.perf_counter() - wall, 2), round(cpu_seconds() - cpu, 2)
    if profiler:
        import pstats
        from torch._dynamo.utils import compile_times

        print(compile_times(repr="str", aggregate=True), file=sys.stderr)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    return took


def until_compiled(t, call, model: str, side: int, started: float) -> dict:
    """With a background compile: calls at the first size until one runs the compiled graph; the seconds
    from the first call's start to the end of that call, the eager calls before it and the switching call."""
    import cachedit_fx

    jobs = cachedit_fx.background_compiles(t)
    if not jobs:
        return {}
    calls, switch = 0, 0.0
    with torch.no_grad():
        while jobs[0].compiled_calls == 0:
            began = time.perf_counter()
            call(**inputs(model, side, 1.0 - (calls % 6 + 1) / 7))
            switch, calls = time.perf_counter() - began, calls + 1
    return {"compiled_after_s": round(time.perf_counter() - started, 2), "eager_calls": jobs[0].eager_calls,
            "switch_call_s": round(switch, 2), "background": jobs[0].status}


def interleaved(model: str, depth, side: int, repeats: int) -> dict:
    """The steady computed and cached step of ``enable`` and ``enable-background`` (its graph loaded from
    the cache the child filled) in one process, in interleaved rounds: the comparison separate processes
    make noisy. First calls are not reported (the two compiles overlap)."""
    import cachedit_fx

    models = {"sync": build(model, depth), "background": build(model, depth)}
    cachedit_fx.enable_cache(models["sync"], **CONFIG)
    cachedit_fx.enable_cache(models["background"], background_compile=True, **CONFIG)
    with torch.no_grad():
        for t in models.values():
            t(**inputs(model, side, 1.0))
        (job,) = cachedit_fx.background_compiles(models["background"])
        job.wait()
        models["background"](**inputs(model, side, 1.0))
    samples: dict = {}
    for _ in range(3 * repeats):
        for name, t in models.items():
            for key, value in steady(t, model, side, Cachedit(t), 1, 6).items():
                samples.setdefault(f"{name}_{key}", []).append(value)
    return {"background": job.status, **{k: round(statistics.median(v), 3) for k, v in samples.items()}}


def region_calls(t) -> int | None:
    from cachedit_fx.install.hook import cache_hook

    hook = cache_hook(t)
    return len(hook.graph.regions) if hook is not None else None


def main():
    model, variant, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    quick = "--quick" in sys.argv
    from torch._dynamo.utils import counters

    depth = {"flux": (2, 2), "wan": (2,)}[model] if quick else {"flux": (19, 38), "wan": (30,)}[model]
    sizes = (QUICK_SIZES if quick else SIZES)[model]
    if variant == "interleaved":
        print(json.dumps({"model": model, "variant": variant, "depth": depth,
                          **interleaved(model, depth, sizes[0], repeats)}))
        return
    t = build(model, depth)
    call, switch = prepare(t, variant, quick)
    out = {"model": model, "variant": variant, "depth": depth, "sizes": sizes}
    started = time.perf_counter()
    out["first_call_s"], out["first_call_cpu_s"] = first_call(call, inputs(model, sizes[0], 1.0),
                                                              "--profile" in sys.argv)
    if variant.startswith("enable-background"):
        out.update(until_compiled(t, call, model, sizes[0], started))
    out.update(steady(call, model, sizes[0], switch, repeats, 3 if quick else 6))
    for key, side in (("second_size_s", sizes[1]), ("third_size_s", sizes[2])):
        if switch:  # a new resolution is a new request (cache-dit keeps its state's shapes within one)
            switch.set(False)
        out[key], _ = first_call(call, inputs(model, side, 1.0))
    out["graphs"] = counters["stats"]["unique_graphs"]
    out["fx_cache_hit"], out["fx_cache_miss"] = counters["inductor"]["fxgraph_cache_hit"], \
        counters["inductor"]["fxgraph_cache_miss"]
    out["aot_cache_hit"], out["aot_cache_miss"] = counters["aot_autograd"]["autograd_cache_hit"], \
        counters["aot_autograd"]["autograd_cache_miss"]
    if variant.startswith("enable"):
        out["region_calls"] = region_calls(t)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
