"""One process of the warm-restart test (tests/install/test_warm_restart.py): the zoo Flux cached by
``enable_cache`` with Inductor, one short request; prints a JSON line with the compile caches' hit and
miss counters, the first call's seconds and the request's cached steps and output (the caller sets
``TORCHINDUCTOR_CACHE_DIR``).

usage: python -m tests.helpers.warm_start [--save FILE | --load FILE]
    --save: write ``torch.compiler.save_cache_artifacts()`` after the request (the cold process);
    --load: ``torch.compiler.load_cache_artifacts()`` before it (a restart on a fresh machine).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--save")
    p.add_argument("--load")
    args = p.parse_args()
    from torch._dynamo.utils import counters

    import cachedit_fx
    from cachedit_fx import zoo
    from cachedit_fx.install.hook import cache_hook

    if args.load:
        torch.compiler.load_cache_artifacts(Path(args.load).read_bytes())
    transformer, inputs = zoo.build_transformer("flux")
    cachedit_fx.enable_cache(transformer, Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.5,
                             max_warmup_steps=2, enable_separate_cfg=False)
    started = time.perf_counter()
    with torch.no_grad():
        transformer(**inputs)
    first_call_s = time.perf_counter() - started
    _, outputs = zoo.denoise(transformer, "flux", inputs, num_steps=6)
    if args.save:
        artifacts = torch.compiler.save_cache_artifacts()
        Path(args.save).write_bytes(artifacts[0] if artifacts else b"")
    (stats,) = cachedit_fx.summary(transformer, logging=False)
    print(json.dumps({
        "fx_hit": counters["inductor"]["fxgraph_cache_hit"], "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
        "fx_bypass": counters["inductor"]["fxgraph_cache_bypass"],
        "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "aot_bypass": counters["aot_autograd"]["autograd_cache_bypass"],
        "regions": len(cache_hook(transformer).graph.regions), "cached_steps": stats.cached_steps,
        "first_call_s": round(first_call_s, 2), "output": outputs[-1].flatten()[:8].tolist(),
    }))


if __name__ == "__main__":
    main()
