"""Compile health of cachedit-fx vs diffusers FirstBlockCache under torch.compile(fullgraph=False).

    python benchmarks/compile_health.py [--quick]

Two requests over the same model with different step counts (and, for cachedit, a different threshold
loaded with handle.configure): graph breaks, graphs, backend compilations (first request / second),
and host syncs per step. Both compile with aot_eager as the inner compiler so that every aten op still
runs through Python, where a TorchDispatchMode counts the ops that read a device value on the host
(aten._local_scalar_dense, aten.item, aten.is_nonzero). With inner="inductor" the cond predicate is
also read on the host once per step by Inductor's wrapper (it calls ``if pred.item()``), the same one
read counted here.

The torch.cond higher-order op runs its predicate check below the TorchDispatchMode (the mode does not
see it), so the table adds a structural count: the torch.cond nodes in cachedit's rewritten graph, each
of which reads its (1-element) predicate on the host once per call on CPU with aot_eager / Inductor.
"""
from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _common import build_model, parse_args, table, write_json
from cachedit_fx.backend import cachedit_backend
from cachedit_fx.runtime.handle import CacheHandle
from cachedit_fx.config import DBCacheConfig
from cachedit_fx import zoo

SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.count += 1
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def cfg(threshold):
    return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                         max_warmup_steps=1, enable_separate_cfg=False)


def measure(name, make, model, inputs, steps_a, steps_b, between=None):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiles = []

    def counting(inner):
        def backend(gm, example_inputs):
            compiles.append(len(gm.graph.nodes))
            return inner(gm, example_inputs)
        return backend

    call, reset = make(counting)
    with torch.no_grad():
        reset()
        zoo.denoise(model, "flux", inputs, num_steps=steps_a, call=call)
        after_a = len(compiles)
        if between:
            between()
        reset()
        mode = SyncCounter()
        with mode:
            zoo.denoise(model, "flux", inputs, num_steps=steps_b, call=call)
    breaks = sum(counters["graph_break"].values())
    return {"method": name, "graph breaks": breaks, "graphs": counters["stats"].get("unique_graphs", len(compiles)),
            "backend compilations (request 1)": after_a, "recompiles (request 2)": len(compiles) - after_a,
            "host syncs / step": mode.count / steps_b, "sync ops": dict(mode.ops),
            "break reasons": sorted(counters["graph_break"])[:5]}


def main():
    args = parse_args("compile_health")
    model, inputs, info = build_model(args.quick)
    steps_a, steps_b = (2, 3) if args.quick else (6, 9)
    from torch._dynamo.backends.debugging import aot_eager

    def make_cachedit(counting):
        handle = CacheHandle(cfg(0.05), None)

        def inner(gm, ex):  # aot_eager, counting the torch.cond nodes of the rewritten graph
            make_cachedit.conds = sum(1 for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond)
            return aot_eager(gm, ex)

        opts = {"cache_config": cfg(0.05), "inner": inner, "handle": handle, "separate_cfg": False}
        m = torch.compile(copy.deepcopy(model), backend=counting(lambda gm, ex: cachedit_backend(gm, ex, opts)),
                          dynamic=False, fullgraph=False)
        make_cachedit.handle = handle
        return m, handle.reset

    def make_fbc(counting):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        m = copy.deepcopy(model)
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.05))
        cm = torch.compile(m, backend=counting(aot_eager), dynamic=False, fullgraph=False)

        def call(**kw):
            with m.cache_context("cond"):
                return cm(**kw)
        return call, m._reset_stateful_cache

    def make_plain(counting):
        return torch.compile(copy.deepcopy(model), backend=counting(aot_eager), dynamic=False), lambda: None

    make_cachedit.conds = 0
    rows = [
        measure("plain torch.compile (no cache)", make_plain, model, inputs, steps_a, steps_b),
        measure("cachedit-fx", make_cachedit, model, inputs, steps_a, steps_b,
                between=lambda: make_cachedit.handle.configure(cfg(0.2))),
        measure("diffusers FirstBlockCache", make_fbc, model, inputs, steps_a, steps_b),
    ]
    for r in rows:
        r["cond predicate reads / step"] = 0
    rows[1]["cond predicate reads / step"] = make_cachedit.conds
    heads = ["method", "graph breaks", "graphs", "backend compilations (request 1)", "recompiles (request 2)",
             "host syncs / step", "sync ops",
             "cond predicate reads / step"]
    print(f"## compile_health ({info['model']}; inner aot_eager; requests of {steps_a} then {steps_b} steps)\n")
    print(table(heads, rows))
    c = rows[1]
    targets = {"0 graph breaks": c["graph breaks"] == 0, "1 compilation": c["backend compilations (request 1)"] == 1,
               "0 recompiles": c["recompiles (request 2)"] == 0, "0 host syncs per step": c["host syncs / step"] == 0}
    print("\ncachedit-fx targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    write_json("compile_health", args, {"info": info, "steps": [steps_a, steps_b], "rows": rows, "targets": targets})


if __name__ == "__main__":
    main()
