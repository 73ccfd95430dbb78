"""One process of the warm-restart test (tests/install/test_warm_restart.py): the zoo Flux cached by
``enable_cache`` with Inductor, one short request; prints a JSON line with the compile caches' hit and
miss counters and the request's cached steps and output (the caller sets ``TORCHINDUCTOR_CACHE_DIR``).

usage: python -m tests.helpers.warm_start
"""
from __future__ import annotations

import json

import torch


def main() -> None:
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters

    import cachedit_fx
    from cachedit_fx import zoo
    from cachedit_fx.install.hook import cache_hook

    transformer, inputs = zoo.build_transformer("flux")
    cachedit_fx.enable_cache(transformer, Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.5,
                             max_warmup_steps=2, enable_separate_cfg=False)
    _, outputs = zoo.denoise(transformer, "flux", inputs, num_steps=6)
    (stats,) = cachedit_fx.summary(transformer, logging=False)
    print(json.dumps({
        "fx_hit": counters["inductor"]["fxgraph_cache_hit"], "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
        "fx_bypass": counters["inductor"]["fxgraph_cache_bypass"],
        "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "aot_bypass": counters["aot_autograd"]["autograd_cache_bypass"],
        "regions": len(cache_hook(transformer).graph.regions), "cached_steps": stats.cached_steps,
        "output": outputs[-1].flatten()[:8].tolist(),
    }))


if __name__ == "__main__":
    main()
