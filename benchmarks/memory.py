"""Extra memory of the cache state per chain, against the size of the chain's activations.

    python benchmarks/memory.py [--quick]

For DBCache and TaylorSeer orders 1 and 2 (F1B0): the sum of ``nbytes`` of every state tensor of each
chain (``handle.chains[i].state.tensors``: reference Fn residual, residual ladders, counters, step logs),
split into the residual buffers (ref + ladders) and the rest, against one copy of the chain's carried
streams (hidden_states and, for two-stream chains, encoder_hidden_states) and of hidden_states alone.
"""
from __future__ import annotations

import copy

import torch

from _common import build_model, parse_args, table, write_json
from cachedit_fx.runtime.handle import CacheHandle
from cachedit_fx.config import DBCacheConfig, TaylorSeerCalibratorConfig


def nbytes(shape, dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def main():
    args = parse_args("memory")
    model, inputs, info = build_model(args.quick)
    cache = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, enable_separate_cfg=False)
    configs = {"DBCache": None, "DBCache + TaylorSeer order 1": TaylorSeerCalibratorConfig(taylorseer_order=1),
               "DBCache + TaylorSeer order 2": TaylorSeerCalibratorConfig(taylorseer_order=2)}
    rows = []
    for name, calib in configs.items():
        torch._dynamo.reset()
        handle = CacheHandle(cache, calib)
        m = torch.compile(copy.deepcopy(model), backend="cachedit", dynamic=False,
                          options={"cache_config": cache, "calibrator_config": calib, "inner": "eager",
                                   "handle": handle, "separate_cfg": False})
        with torch.no_grad():
            m(**inputs)
        for i, chain in enumerate(handle.chains):
            t = chain.state.tensors
            total = sum(x.nbytes for x in t.values())
            residual = sum(x.nbytes for k, x in t.items() if k == "ref" or k.startswith("ladder_"))
            streams = [nbytes(s.shape, s.dtype) for s in chain.layout.streams]
            hidden = max(streams) if streams else 0
            act = sum(streams)
            rows.append({"config": name, "chain": f"{i}: {chain.info.name}", "blocks": chain.info.n_blocks,
                         "state MiB": total / 2**20, "residual buffers MiB": residual / 2**20,
                         "counters+logs KiB": (total - residual) / 2**10, "streams MiB": act / 2**20,
                         "hidden_states MiB": hidden / 2**20, "state / streams": total / act if act else float("nan"),
                         "state / hidden_states": total / hidden if hidden else float("nan"),
                         "tensors": {k: [list(x.shape), str(x.dtype).replace("torch.", "")] for k, x in t.items()}})
    heads = ["config", "chain", "blocks", "state MiB", "residual buffers MiB", "counters+logs KiB", "streams MiB",
             "hidden_states MiB", "state / streams", "state / hidden_states"]
    print(f"## memory ({info['model']}; F1B0, one CFG branch)\n")
    print(table(heads, rows))
    write_json("memory", args, {"info": info, "rows": rows})


if __name__ == "__main__":
    main()
