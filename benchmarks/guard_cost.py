"""Dynamo's guards on a one-graph compile of the latency-bound Flux: how many, which ones the guard-light
install drops (install/owned.py ``drop_module_guards``), and their time per call, beside the Fn-only copy's.

    python benchmarks/guard_cost.py [--quick]

Guard counts are exact (the filter sees every guard). Guard time: the profiler's "TorchDynamo Cache
Lookup" per call, the minimum over 5 rounds of 20 calls (minima: robust to a busy machine). The compiles
use the eager backend: the guards do not depend on the inner compiler. --quick: the zoo's tiny Flux.
"""
from __future__ import annotations

import collections
import copy

import torch

from _common import LATENCY_BOUND, build_flux, build_model, first_block_only, guard_check_us, parse_args, table, \
    write_json
from cachedit_fx.capture.dynamo import private_code
from cachedit_fx.install.owned import drop_module_guards



def keep_all(entries):
    return [True] * len(entries)


def compiled(model, keep, counts: dict, name: str):
    """``model`` compiled as one graph (eager backend) with the guard filter ``keep``, recording into
    ``counts[name]`` the guards seen, kept and dropped by type."""
    def recording(entries):
        flags = keep(entries)
        dropped = collections.Counter(e.guard_type for e, k in zip(entries, flags) if not k)
        counts[name] = {"guards": len(entries), "kept": sum(flags), "dropped": dict(dropped.most_common())}
        return flags

    model.forward = private_code(model.forward)
    return torch.compile(model, backend="eager", fullgraph=True, options={"guard_filter_fn": recording})


def main():
    args = parse_args("guard_cost")
    torch.manual_seed(0)
    model, inputs, info = build_model(True) if args.quick else build_flux(*LATENCY_BOUND)
    model = model.eval()
    rounds, calls = (2, 3) if args.quick else (5, 20)
    counts = {}
    variants = {"full guards": compiled(copy.deepcopy(model), keep_all, counts, "full guards"),
                "guard-light (drop_module_guards)": compiled(copy.deepcopy(model), drop_module_guards, counts,
                                                             "guard-light (drop_module_guards)"),
                "Fn-only copy, full guards": compiled(first_block_only(model), keep_all, counts,
                                                      "Fn-only copy, full guards")}
    rows = []
    with torch.no_grad():
        for name, c in variants.items():
            c(**inputs)
            us = min(guard_check_us(lambda c=c: c(**inputs), calls) for _ in range(rounds))
            top = ", ".join(f"{n} {k}" for k, n in list(counts[name]["dropped"].items())[:6])
            rows.append({"compile": name, "guards": counts[name]["guards"], "kept": counts[name]["kept"],
                         "guard us per call (min)": us, "dropped (most common)": top or "-"})
    light = counts["guard-light (drop_module_guards)"]
    assert light["kept"] < light["guards"] and counts["full guards"]["kept"] == counts["full guards"]["guards"]
    print(f"## guard_cost ({info.get('model', info)}; eager backend; min of {rounds} x {calls})\n")
    print(table(["compile", "guards", "kept", "guard us per call (min)", "dropped (most common)"], rows))
    write_json("guard_cost", args, {"info": info, "rounds": rounds, "calls": calls, "rows": rows, "counts": counts})


if __name__ == "__main__":
    main()
