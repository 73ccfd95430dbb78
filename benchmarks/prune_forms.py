"""DBPrune in one graph, two forms: a ``torch.cond`` per prunable block ("cond", what the pass emits) vs every
block run with its result selected by the decision ("masked": no cond, no host read, no saving).

    python benchmarks/prune_forms.py [--quick]

On the zoo's tiny Flux (4 double + 4 single blocks as one chain of 8; DBPrune F1B0, threshold 0.3,
warmup 2: 7 prunable blocks, pruned in 5 of 8 steps), and without --quick also with Inductor, and on the
benchmarks' medium random Flux (2 + 6 blocks, dim 128, 608 tokens; eager inner) where a block's work shows
in the step time. Per model, form and inner compiler: the first call's wall time (Dynamo + the pass + the inner compile), the nodes of
the rewritten graph handed to the inner compiler and of its aten graph (cond subgraphs included), the
torch.cond nodes (each is one host read of its predicate per call under aot_eager / Inductor), the median
time of an 8-step request (calls interleaved across the forms), and the decisions and outputs (the two
forms must agree). Wall times on a shared machine are noisy: the JSON records the load average.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch

from _common import MEDIUM, MEDIUM_SIDE, MEDIUM_TXT, build_flux, compile_own, parse_args, table, time_interleaved, \
    write_json
from cachedit_fx import zoo
from cachedit_fx.backend.inner import CACHED_GRAPH_INDUCTOR_OPTIONS, inner_compile
from cachedit_fx.config import DBPruneConfig, pass_settings
from cachedit_fx.passes import apply
from cachedit_fx.runtime.handle import CacheHandle, CompiledGraph

STEPS = 8
CONFIG = DBPruneConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.3, max_warmup_steps=2,
                       enable_separate_cfg=False)


def nodes(gm: torch.fx.GraphModule) -> int:
    """Nodes of ``gm`` and of every subgraph it holds (cond branches)."""
    return len(gm.graph.nodes) + sum(nodes(m) for m in gm.children() if isinstance(m, torch.fx.GraphModule))


def conds(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is torch.ops.higher_order.cond for n in gm.graph.nodes)


def form_backend(form: str, inner: str, handle: CacheHandle, record: dict):
    """The cachedit backend's steps (passes.apply, inner compile, state appended to every call) with the
    pass settings' ``prune_form`` set; records node counts."""

    def backend(gm, example_inputs):
        settings = dataclasses.replace(pass_settings(CONFIG, separate_cfg=False), prune_form=form)
        result = apply(gm, settings)
        assert result.modified, result.unmatched
        handle.add(CompiledGraph(result.chains))
        states = [t for c in result.chains for t in c.state.ordered()]
        record.update(graph_nodes=nodes(result.graph_module), conds=conds(result.graph_module))
        if inner == "aot_eager":
            from torch._dynamo.backends.common import aot_autograd

            def count_aten(aten_gm, _):
                record["aten_nodes"] = nodes(aten_gm)
                return aten_gm.forward

            compiled = aot_autograd(fw_compiler=count_aten)(result.graph_module, list(example_inputs) + states)
        else:
            compiled = inner_compile(result.graph_module, list(example_inputs) + states, inner, None,
                                     CACHED_GRAPH_INDUCTOR_OPTIONS)
        return lambda *args: compiled(*args, *states)

    return backend


def build(name: str, model, inputs, form: str, inner: str) -> dict:
    handle, record = CacheHandle(CONFIG, None), {"model": name, "form": form, "inner": inner}
    m = copy.deepcopy(model)
    call = compile_own(m, form_backend(form, inner, handle, record), fullgraph=True)
    started = time.perf_counter()
    _, outs = zoo.denoise(m, "flux", inputs, num_steps=STEPS, call=call)
    record["first request s (compile + 8 steps)"] = time.perf_counter() - started
    log = handle.chains[0].state.tensors["pruned_log"][0, :STEPS].tolist()
    return dict(record=record, model=m, call=call, handle=handle, outputs=outs, pruned=log)


def main():
    args = parse_args("prune_forms")
    models = {"zoo flux": zoo.build_transformer("flux")}
    variants = [("zoo flux", inner) for inner in ("eager", "aot_eager")]
    if not args.quick:
        models["medium flux"] = build_flux(MEDIUM, MEDIUM_SIDE, MEDIUM_TXT)[:2]
        variants += [("zoo flux", "inductor"), ("medium flux", "eager")]
    runs = {(name, form, inner): build(name, *models[name], form, inner)
            for name, inner in variants for form in ("cond", "masked")}
    for (name, form, inner), r in runs.items():
        reference = runs[(name, "cond", "eager")]
        assert r["pruned"] == reference["pruned"], (name, form, inner, r["pruned"], reference["pruned"])
        r["record"]["pruned blocks per step"] = str(r["pruned"])
        r["record"]["max rel diff vs cond/eager"] = max(
            float((a - b).abs().max() / b.abs().max()) for a, b in zip(r["outputs"], reference["outputs"]))

    def request(r, inputs):
        def go():
            r["handle"].reset()
            zoo.denoise(r["model"], "flux", inputs, num_steps=STEPS, call=r["call"])
        return go

    timed = time_interleaved({key: request(r, models[key[0]][1]) for key, r in runs.items()},
                             repeats=3 if args.quick else 11)
    rows = [{**r["record"], "8-step request ms (median)": 1000 * timed[key]["median_s"]} for key, r in runs.items()]
    headers = ["model", "form", "inner", "first request s (compile + 8 steps)", "graph_nodes", "aten_nodes", "conds",
               "8-step request ms (median)", "pruned blocks per step", "max rel diff vs cond/eager"]
    print("## prune_forms\n")
    print(table(headers, rows))
    write_json("prune_forms", args, {"config": dataclasses.asdict(CONFIG), "rows": rows})


if __name__ == "__main__":
    main()
